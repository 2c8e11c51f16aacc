"""QuantStub, DeQuantStub and FloatFunctional: the markers of the deploy region.

A float model puts a :class:`QuantStub` where data enters the quantized region, a
:class:`DeQuantStub` where it leaves, and does its tensor arithmetic (residual adds, cats...)
through a :class:`FloatFunctional` instance per call site, so that every such op owns one
output observer and, after convert, one output scale. torch.ao's eager-mode classes are accepted
and swapped for these by ``prepare``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qatkit.base import recorder
from qatkit.base.errors import fail


class QuantStub(nn.Module):
    """Entry of the quantized region. ``scale`` fixes the input scale (camera input: 1/128)."""

    _qatkit_leaf = True

    def __init__(self, scale: float | None = None, dtype: str = "qint8") -> None:
        super().__init__()
        self.scale, self.dtype = scale, dtype
        self.activation_post_process: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and not x.is_floating_point():
            raise _not_float(x)
        return self.activation_post_process(x)


def _not_float(x: torch.Tensor) -> Exception:
    from qatkit.base.errors import fail
    dt = str(x.dtype).removeprefix("torch.")
    hint = "x.float() / 255 (then the training normalisation)" if dt == "uint8" else "x.float()"
    return fail("QK000", f"a QuantStub received a {dt} tensor; it quantizes real values, so "
                "what enters the quantized region must be a float tensor.", f"pass {hint}")


class DeQuantStub(nn.Module):
    """Exit of the quantized region: float (or high-precision) values leave here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _tensors(*args: object) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_tensors(*a))
        elif isinstance(a, torch.Tensor):
            out.append(a)
    return out


def _any_quantized(inputs: tuple) -> bool:
    from qatkit.base.qtensor import QTensor
    return any(isinstance(a, QTensor) or (isinstance(a, (list, tuple)) and _any_quantized(a))
               for a in inputs)


class FloatFunctional(nn.Module):
    """Tensor arithmetic with an output observer. Use one instance per call site: an
    instance called twice shares one observer and one output scale (rule QK007).

    ``fused_activation`` is set by ``fuse`` when a ReLU follows the add (conv+add+relu)."""

    def __init__(self) -> None:
        super().__init__()
        self.activation_post_process: nn.Module = nn.Identity()
        self.fused_activation: str | None = None

    def forward(self, *args: object) -> None:
        raise fail("QK000", "FloatFunctional is not called directly.",
                   "call one of its methods: add, add_scalar, sub, mul, mul_scalar, cat, "
                   "stack, matmul, sum, mean, maximum, minimum")

    def _call(self, op: str, fn, inputs: tuple, *args, arguments: dict | None = None,
              **kwargs) -> torch.Tensor:
        """``fn(*args, **kwargs)``, observed. ``arguments``: the method's non-tensor arguments,
        reported to recorders under the names the fixed-point method takes."""
        if _any_quantized(inputs):  # float form in a fixed-point model: added after convert
            name = self.__dict__.get("_qatkit_name")
            who = f"FloatFunctional '{name}'" if name else "a FloatFunctional"
            why = ("was added (or replaced) after calibration/QAT and convert: it has no "
                   "calibrated output scale" if isinstance(self.activation_post_process,
                                                           nn.Identity) else
                   "is still in QAT form: convert did not turn it into fixed point (one "
                   "instance reachable under two names is converted under one only)")
            err = fail("QK008", f"{who} ({op}) receives quantized values in the fixed-point "
                       f"model but {why}, so its inputs cannot be requantized to a common "
                       "scale.",
                       "add it to the float model (one instance per call site) and go through "
                       "prepare, calibration/QAT and convert again (or apply it after the "
                       "DeQuantStub, on float values)")
            err.qatkit_module = self  # the doctor names it in its report
            raise err
        with recorder.inside_leaf():
            y = fn(*args, **kwargs)
            if self.fused_activation == "relu":
                y = torch.relu(y)
            y = self.activation_post_process(y)
        rec = recorder.active()
        if rec is not None:
            rec.functional(self, op, tuple(_tensors(*inputs)), y, arguments)
        return y

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._call("add", torch.add, (x, y), x, y)

    def add_relu(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._call("add_relu", lambda a, b: torch.relu(a + b), (x, y), x, y)

    def add_scalar(self, x: torch.Tensor, c: float) -> torch.Tensor:
        return self._call("add_scalar", torch.add, (x,), x, c, arguments={"c": c})

    def sub(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._call("sub", torch.sub, (x, y), x, y)

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._call("mul", torch.mul, (x, y), x, y)

    def mul_scalar(self, x: torch.Tensor, c: float) -> torch.Tensor:
        return self._call("mul_scalar", torch.mul, (x,), x, c, arguments={"c": c})

    def cat(self, xs: list[torch.Tensor] | tuple[torch.Tensor, ...], dim: int = 0
            ) -> torch.Tensor:
        return self._call("cat", torch.cat, (xs,), list(xs), dim=dim, arguments={"dim": dim})

    concat = cat

    def stack(self, xs: list[torch.Tensor] | tuple[torch.Tensor, ...], dim: int = 0
              ) -> torch.Tensor:
        return self._call("stack", torch.stack, (xs,), list(xs), dim=dim,
                          arguments={"dim": dim})

    def matmul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._call("matmul", torch.matmul, (x, y), x, y)

    def sum(self, x: torch.Tensor, dim: int | tuple[int, ...], keepdim: bool = False
            ) -> torch.Tensor:
        return self._call("sum", torch.sum, (x,), x, dim, keepdim=keepdim,
                          arguments={"dim": dim, "keepdim": keepdim})

    def mean(self, x: torch.Tensor, dim: int | tuple[int, ...], keepdim: bool = False
             ) -> torch.Tensor:
        return self._call("mean", torch.mean, (x,), x, dim, keepdim=keepdim,
                          arguments={"dim": dim, "keepdim": keepdim})

    def maximum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._call("maximum", torch.maximum, (x, y), x, y)

    def minimum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._call("minimum", torch.minimum, (x, y), x, y)
