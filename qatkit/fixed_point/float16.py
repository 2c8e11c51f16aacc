"""float16 operators of the fixed-point model (``docs/fixed-point.md`` section 19).

On nash-p/nash-h every operator but a GEMM may run in IEEE float16. In the fixed-point model a
float16 value is a ``torch.float16`` tensor (not a QTensor). Every float16 result here is the
exact real result rounded once to float16 (round to nearest, ties to even), or, for the
operators without a closed form (softmax, layer norm, the transcendental activations, bilinear
resizing), PyTorch's float64 kernel on the exact float64 values of the float16 inputs, rounded
once (:func:`qatkit.fixed_point.f16_math.f16`). A result that rounds beyond the finite
float16 range (|x| >= 65520) is refused, never saturated or left as inf.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from qatkit.base import recorder
from qatkit.base.errors import fail
from qatkit.base.qtensor import QTensor
from qatkit.base.quant_math import along
from qatkit.fixed_point.f16_math import F16_MAX, check_finite, f16, gemm_output, overflow_error
from qatkit.fixed_point.kernels import accumulator_scale, avg_pool_divisors
from qatkit.fixed_point.modules import QModule, _adaptive_kernel

__all__ = ["F16_MAX", "MAX_REDUCE", "QFloat16Functional", "QFloat16Op", "QFloat16QuantStub",
           "as_f16", "check_finite", "dequantize_f16", "f16", "gemm_output", "overflow_error"]

# float16 values are multiples of 2^-24 below 2^16: up to this many of them sum exactly in
# float64, and a mean of that many is rounded correctly by float64 division then float16
# rounding (section 19: the float64 quotient cannot land on a float16 midpoint it is not)
MAX_REDUCE = 8191


def dequantize_f16(x: QTensor) -> torch.Tensor:
    """int -> float16: ``q * s`` in float64 (exact for int8/int16: at most 16 + 24 bits; for an
    int32 accumulator rounded once in float64), rounded once to float16."""
    s = along(x.scale.to(torch.float64), x.axis, x.q.dim())
    return f16(x.q.to(torch.float64) * s)


def as_f16(x: Any, who: str) -> torch.Tensor:
    """A float16 operator's input: a float16 tensor as it is, a QTensor dequantized to float16."""
    if isinstance(x, QTensor):
        return check_finite(dequantize_f16(x), who)
    if isinstance(x, torch.Tensor) and x.dtype == torch.float16:
        return x
    raise fail("QK102", f"{who} runs in float16 and received "
               + (f"a {str(x.dtype).removeprefix('torch.')} tensor" if isinstance(
                   x, torch.Tensor) else type(x).__name__)
               + ": a value reached it without passing a QuantStub.",
               "put a QuantStub on every path by which data enters the quantized region")


class _F16Module(QModule):
    """A float16 operator: no output scale (``out_scale`` is None), ``out_dtype`` float16."""

    def __init__(self) -> None:
        super().__init__(None, "float16")
        self.qualified_name = ""  # convert names it, for errors about this module

    def who(self) -> str:
        name = self.qualified_name
        return f"{type(self).__name__} {name!r}" if name else type(self).__name__

    def _round(self, y64: torch.Tensor) -> torch.Tensor:
        return check_finite(f16(y64), self.who())


class QFloat16QuantStub(_F16Module):
    """float -> float16 at the region's entry: the float32 input rounded once to float16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise fail("QK000", "the fixed-point model's QuantStub needs a float tensor.",
                       "pass x.float()")
        return self._round(x.to(torch.float64))


class QFloat16Op(_F16Module):
    """An operator that runs in float16 (activations, softmax, layer norm, pooling, resizing):
    inputs as float16, PyTorch's float64 kernel on their exact values, one rounding. Average
    pooling divides its exact window sum itself (one rounding, section 19)."""

    def __init__(self, op: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.op = copy.deepcopy(op).double()  # float64 parameters: float32 ones, exactly

    def forward(self, x: Any) -> torch.Tensor:
        with recorder.inside_leaf():
            v = as_f16(x, self.who()).to(torch.float64)
            if self.kind in ("avg_pool2d", "adaptive_avg_pool2d"):
                y = self._avg_pool(v)
            elif self.kind in ("leaky_relu", "prelu"):
                y = self._prelu(v)
            else:
                y = self.op(v)
            return self._round(y)

    def _prelu(self, v: torch.Tensor) -> torch.Tensor:
        """x for x >= 0, else x times the slope held in float16 (like every constant operand
        of a float16 elementwise op); the product is exact in float64."""
        op = self.op
        slope = torch.as_tensor(op.negative_slope if isinstance(op, nn.LeakyReLU)
                                else op.weight.detach(), dtype=torch.float64).reshape(-1)
        slope = f16(slope).to(torch.float64)
        if slope.numel() > 1:
            if v.dim() < 2 or v.shape[1] != slope.numel():
                raise fail("QK106", f"{self.who()}: PReLU with {slope.numel()} slopes received "
                           f"a tensor of shape {tuple(v.shape)} (channels are axis 1).",
                           "use num_parameters equal to the channel count, or 1")
            slope = along(slope, 1, v.dim())
        else:
            slope = slope.reshape(())
        return torch.where(v >= 0, v, v * slope)

    def _avg_pool(self, v: torch.Tensor) -> torch.Tensor:
        op = self.op
        if self.kind == "adaptive_avg_pool2d":
            k = _adaptive_kernel(v.shape[-2:], op.output_size)
            s, p, ceil, incl, override = k, (0, 0), False, True, None
        else:
            k, s, p = _pair(op.kernel_size), _pair(op.stride or op.kernel_size), _pair(op.padding)
            ceil, incl, override = op.ceil_mode, op.count_include_pad, op.divisor_override
        sums = F.avg_pool2d(v, k, s, p, ceil_mode=ceil, count_include_pad=True,
                            divisor_override=1)  # exact: at most MAX_REDUCE float16 values
        if override is not None:
            d = torch.tensor(float(override), dtype=torch.float64)
        else:
            dh, dw = (avg_pool_divisors(n, k_, s_, p_, ceil, incl)
                      for n, k_, s_, p_ in zip(v.shape[-2:], k, s, p))
            d = (dh[:, None] * dw[None, :]).to(torch.float64)
        if k[0] * k[1] > MAX_REDUCE:
            raise _reduce_error(self.who(), k[0] * k[1])
        return sums / d


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _reduce_error(who: str, n: int) -> Exception:
    return fail("QK106", f"{who} averages or sums {n} float16 values; the fixed-point model "
                f"rounds such a reduction exactly only up to {MAX_REDUCE} values.",
                "reduce in two steps (e.g. pool, then pool again), or give it an integer "
                "qconfig")


class QFloat16Functional(_F16Module):
    """FloatFunctional's methods in float16 (section 19): each result is the exact result of the
    float16 operands rounded once (sums and products of float16 values are exact in float64)."""

    def __init__(self, fused_activation: str | None) -> None:
        super().__init__()
        self.fused_activation = fused_activation

    def forward(self, *args: Any) -> None:
        raise fail("QK000", "FloatFunctional is not called directly.", "call one of its methods")

    def _v(self, x: Any) -> torch.Tensor:
        return as_f16(x, self.who()).to(torch.float64)

    def _call(self, op: str, inputs: tuple, compute: Any, **arguments: Any) -> torch.Tensor:
        """``compute()`` (float64, on the float16 inputs) rounded once; recorded as one op."""
        with recorder.inside_leaf():
            y = self._round(compute())
            if self.fused_activation == "relu" or op == "add_relu":
                y = torch.clamp_min(y, 0)
        rec = recorder.active()
        if rec is not None:
            rec.functional(self, op, tuple(inputs), y, arguments)
        return y

    def add(self, a: Any, b: Any) -> torch.Tensor:
        return self._call("add", (a, b), lambda: self._v(a) + self._v(b))

    def add_relu(self, a: Any, b: Any) -> torch.Tensor:
        return self._call("add_relu", (a, b), lambda: self._v(a) + self._v(b))

    def sub(self, a: Any, b: Any) -> torch.Tensor:
        return self._call("sub", (a, b), lambda: self._v(a) - self._v(b))

    def add_scalar(self, a: Any, c: float) -> torch.Tensor:  # the constant held in float16
        return self._call("add_scalar", (a,), lambda: self._v(a) + _const(c), c=c)

    def mul(self, a: Any, b: Any) -> torch.Tensor:
        return self._call("mul", (a, b), lambda: self._v(a) * self._v(b))

    def mul_scalar(self, a: Any, c: float) -> torch.Tensor:
        return self._call("mul_scalar", (a,), lambda: self._v(a) * _const(c), c=c)

    def maximum(self, a: Any, b: Any) -> torch.Tensor:
        return self._call("maximum", (a, b), lambda: torch.maximum(self._v(a), self._v(b)))

    def minimum(self, a: Any, b: Any) -> torch.Tensor:
        return self._call("minimum", (a, b), lambda: torch.minimum(self._v(a), self._v(b)))

    def cat(self, xs: Any, dim: int = 0) -> torch.Tensor:
        return self._call("cat", tuple(xs), lambda: torch.cat([self._v(x) for x in xs], dim),
                          dim=dim)

    concat = cat

    def stack(self, xs: Any, dim: int = 0) -> torch.Tensor:
        return self._call("stack", tuple(xs),
                          lambda: torch.stack([self._v(x) for x in xs], dim), dim=dim)

    def _reduce(self, a: Any, dim: Any, keepdim: bool, op: str) -> torch.Tensor:
        def compute() -> torch.Tensor:
            v = self._v(a)
            s = v.sum(dim, keepdim=keepdim)
            n = v.numel() // max(s.numel(), 1)
            if n > MAX_REDUCE:
                raise _reduce_error(self.who(), n)
            return s if op == "sum" else s / n
        return self._call(op, (a,), compute, dim=dim, keepdim=keepdim)

    def sum(self, a: Any, dim: Any, keepdim: bool = False) -> torch.Tensor:
        return self._reduce(a, dim, keepdim, "sum")

    def mean(self, a: Any, dim: Any, keepdim: bool = False) -> torch.Tensor:
        return self._reduce(a, dim, keepdim, "mean")

    def matmul(self, a: Any, b: Any) -> torch.Tensor:
        """A GEMM: integer operands, the exact integer product (float64 holds it: products
        below 2^31, sums below 2^53), the float16 output of :func:`gemm_output`."""
        if not (isinstance(a, QTensor) and isinstance(b, QTensor)) or a.axis is not None \
                or b.axis is not None:
            raise fail("QK102", f"{self.who()}: matmul is a GEMM, whose operands are integers "
                       "on the chip; it received a float16 (or per-channel) operand.",
                       "put a QuantStub before each operand that comes from a float16 operator")
        acc = torch.matmul(a.q.to(torch.float64), b.q.to(torch.float64))
        return self._call("matmul", (a, b), lambda: gemm_output(
            acc, accumulator_scale(a.scale, b.scale), acc.dim() - 1, None,
            self.who()).to(torch.float64))


def _const(c: float) -> torch.Tensor:
    """A scalar operand as the float16 constant the chip holds (rounded once)."""
    return f16(torch.tensor(float(c), dtype=torch.float64)).to(torch.float64)
