"""QTensor: the integer values and scale that flow through a fixed-point model.

A QTensor stands for ``q * scale`` (``docs/fixed-point.md`` section 1). It is not a
``torch.Tensor``: shape-only operations (view, reshape, flatten, permute, ...), ReLU, max pooling,
dropout and nearest resizing work on it because they move integers without changing them; any
other torch function raises a clear error, because in the fixed-point model every
value-changing op needs a calibrated output scale (rules QK008/QK102).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function

from qatkit.base.errors import fail
from qatkit.base.frames import module_of


class QTensor:
    """A quantized tensor of the fixed-point model: integers ``q`` (held in an integer torch
    tensor) with ``scale`` (per tensor, or per channel along ``axis``) and ``dtype``
    ("qint8", "qint16", "qint32"); its real value is ``q * scale``."""

    __slots__ = ("axis", "dtype", "q", "scale")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: str,
                 axis: int | None = None) -> None:
        self.q, self.scale, self.dtype = q, scale, dtype
        self.axis = axis if scale.dim() > 0 else None

    # ---- tensor-like surface used by model code -------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def size(self, dim: int | None = None) -> Any:
        return self.q.size() if dim is None else self.q.size(dim)

    def dim(self) -> int:
        return self.q.dim()

    def numel(self) -> int:
        return self.q.numel()

    @property
    def ndim(self) -> int:
        return self.q.dim()

    @property
    def device(self) -> torch.device:
        return self.q.device

    def __repr__(self) -> str:
        s = self.scale if self.scale.dim() else float(self.scale)
        return f"QTensor({self.dtype}, shape={tuple(self.q.shape)}, scale={s})"

    def dequantize(self) -> torch.Tensor:
        s = self.scale.to(torch.float64)
        if self.axis is not None:
            shape = [1] * self.q.dim()
            shape[self.axis] = -1
            s = s.reshape(shape)
        return (self.q.to(torch.float64) * s).to(torch.float32)

    def view(self, *shape: Any) -> QTensor:
        return torch.reshape(self, _shape_arg(shape))

    def reshape(self, *shape: Any) -> QTensor:
        return torch.reshape(self, _shape_arg(shape))

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> QTensor:
        return torch.flatten(self, start_dim, end_dim)

    def permute(self, *dims: Any) -> QTensor:
        return torch.permute(self, _shape_arg(dims))

    def transpose(self, d0: int, d1: int) -> QTensor:
        return torch.transpose(self, d0, d1)

    def squeeze(self, *dim: int) -> QTensor:
        return torch.squeeze(self, *dim)

    def unsqueeze(self, dim: int) -> QTensor:
        return torch.unsqueeze(self, dim)

    def contiguous(self) -> QTensor:
        return self

    def __getitem__(self, idx: Any) -> QTensor:
        if self.axis is not None:
            raise _unsupported("indexing of a per-channel (high-precision) output")
        return QTensor(self.q[idx], self.scale, self.dtype)

    def _with(self, q: torch.Tensor, axis: int | None) -> QTensor:
        return QTensor(q, self.scale, self.dtype, axis)

    # Arithmetic and tensor methods go through torch's function dispatch, as on a tensor: in a
    # model with generated operators (``qatkit.quantization.call_sites``) the call site's
    # operator computes them; anywhere else they are refused by ``__torch_function__``.
    def _op(self, method: str, *args: Any, **kwargs: Any) -> Any:
        func = getattr(torch.Tensor, method)
        return handle_torch_function(func, (self, *args), self, *args, **kwargs)

    def __add__(self, other: Any) -> Any:
        return self._op("__add__", other)

    def __radd__(self, other: Any) -> Any:
        return self._op("__radd__", other)

    def __iadd__(self, other: Any) -> Any:
        return self._op("__iadd__", other)

    def __sub__(self, other: Any) -> Any:
        return self._op("__sub__", other)

    def __rsub__(self, other: Any) -> Any:
        return self._op("__rsub__", other)

    def __isub__(self, other: Any) -> Any:
        return self._op("__isub__", other)

    def __mul__(self, other: Any) -> Any:
        return self._op("__mul__", other)

    def __rmul__(self, other: Any) -> Any:
        return self._op("__rmul__", other)

    def __imul__(self, other: Any) -> Any:
        return self._op("__imul__", other)

    def __truediv__(self, other: Any) -> Any:
        return self._op("__truediv__", other)

    def __matmul__(self, other: Any) -> Any:
        return self._op("__matmul__", other)

    def __getattr__(self, name: str) -> Any:
        # other tensor methods (x.mean(...), x.chunk(...), x.sigmoid()...)
        if name.startswith("_") or not callable(getattr(torch.Tensor, name, None)):
            raise AttributeError(f"'QTensor' object has no attribute {name!r}")
        return lambda *args, **kwargs: self._op(name, *args, **kwargs)

    # ---- torch functions ------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        handler = _HANDLERS.get(name)
        if handler is None:
            raise _left_float() or _unsupported(f"torch function {name!r}")
        return handler(*args, **kwargs)


def _left_float() -> Exception | None:
    """QK008 naming the module when quantized values reach one that convert left float
    because no example input or calibration batch ever reached it (``_qatkit_unreached``)."""
    f = sys._getframe(2)
    while f is not None:
        mod = module_of(f)
        if mod is not None:
            name = mod.__dict__.get("_qatkit_unreached")
            if name is None:
                return None
            return fail("QK008", f"{type(mod).__name__} '{name}' receives quantized values in "
                        "the fixed-point model, but no example input or calibration batch "
                        "ever reached it, so it was never quantized and has no integer form "
                        "(a branch those inputs do not take).",
                        "pass example_inputs to qk.prepare (and calibration batches) that "
                        "take this branch, then calibrate/train and convert again")
        f = f.f_back
    return None


def _shape_arg(shape: tuple) -> Any:
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape


def _unsupported(what: str) -> Exception:
    return fail("QK102", f"{what} was applied to a quantized tensor in the fixed-point model. "
                "It has no integer form here, or no calibrated output scale.",
                "express it with a quantizable module or a FloatFunctional method so it is "
                "calibrated and converted, or move it after the DeQuantStub")


def _new_axis(old: torch.Size, new: torch.Size, axis: int | None) -> int | None:
    """Where the per-channel axis lands after a reshape (an error if it is split or merged)."""
    if axis is None:
        return None
    before = math.prod(old[:axis])
    for j in range(len(new)):
        if math.prod(new[:j]) == before and new[j] == old[axis]:
            return j
    raise _unsupported("a reshape that splits or merges the channel axis of a per-channel output")


def _reshape(x: QTensor, shape: Any) -> QTensor:
    q = x.q.reshape(shape)
    return x._with(q, _new_axis(x.q.shape, q.shape, x.axis))


def _flatten(x: QTensor, start_dim: int = 0, end_dim: int = -1) -> QTensor:
    q = torch.flatten(x.q, start_dim, end_dim)
    return x._with(q, _new_axis(x.q.shape, q.shape, x.axis))


def _permute(x: QTensor, dims: Any) -> QTensor:
    dims = [d % x.q.dim() for d in dims]
    return x._with(x.q.permute(dims), None if x.axis is None else dims.index(x.axis))


def _transpose(x: QTensor, d0: int, d1: int) -> QTensor:
    perm = list(range(x.q.dim()))
    d0, d1 = d0 % x.q.dim(), d1 % x.q.dim()
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _permute(x, perm)


def _squeeze(x: QTensor, *dim: Any) -> QTensor:
    q = x.q.squeeze(*dim)
    return x._with(q, _new_axis(x.q.shape, q.shape, x.axis))


def _unsqueeze(x: QTensor, dim: int) -> QTensor:
    q = x.q.unsqueeze(dim)
    return x._with(q, _new_axis(x.q.shape, q.shape, x.axis))


def _relu(x: QTensor, inplace: bool = False) -> QTensor:
    return x._with(torch.clamp_min(x.q, 0), x.axis)


def _max_pool2d(x: QTensor, *args: Any, **kwargs: Any) -> QTensor:
    if kwargs.get("return_indices"):
        raise _unsupported("max_pool2d with return_indices")
    kwargs.pop("return_indices", None)
    # Integers below 2^24 are exact in float32; max pooling never changes a value.
    q = F.max_pool2d(x.q.to(torch.float32), *args, **kwargs).to(x.q.dtype)
    return x._with(q, x.axis)


def _chunk(x: QTensor, chunks: int, dim: int = 0) -> tuple[QTensor, ...]:
    return tuple(x._with(q, _split_axis(x, dim)) for q in torch.chunk(x.q, chunks, dim))


def _split(x: QTensor, split_size_or_sections: Any, dim: int = 0) -> tuple[QTensor, ...]:
    return tuple(x._with(q, _split_axis(x, dim))
                 for q in torch.split(x.q, split_size_or_sections, dim))


def _split_axis(x: QTensor, dim: int) -> int | None:
    if x.axis is not None and dim % x.q.dim() == x.axis:
        raise _unsupported("splitting a per-channel (high-precision) output along its channels")
    return x.axis


def _repeat(x: QTensor, *sizes: Any) -> QTensor:
    if x.axis is not None:
        raise _unsupported("repeat of a per-channel (high-precision) output")
    return x._with(x.q.repeat(*_shape_arg(sizes)), None)


def _expand(x: QTensor, *sizes: Any) -> QTensor:
    q = x.q.expand(*_shape_arg(sizes))
    return x._with(q, None if x.axis is None else x.axis + q.dim() - x.q.dim())


def _pad(x: QTensor, pad: Any, mode: str = "constant", value: float | None = None) -> QTensor:
    if mode != "constant" or value not in (None, 0, 0.0):
        raise _unsupported(f"pad(mode={mode!r}, value={value!r}) (only zero padding keeps the "
                           "integers: 0 is exactly 0 at every scale)")
    return x._with(F.pad(x.q, pad), x.axis)


def _adaptive_max_pool2d(x: QTensor, output_size: Any, return_indices: bool = False
                         ) -> QTensor:
    if return_indices:
        raise _unsupported("adaptive_max_pool2d with return_indices")
    q = F.adaptive_max_pool2d(x.q.to(torch.float32), output_size).to(x.q.dtype)
    return x._with(q, x.axis)


def _identity(x: QTensor, *args: Any, **kwargs: Any) -> QTensor:
    return x


def _dropout(x: QTensor, p: float = 0.5, training: bool = False, inplace: bool = False
             ) -> QTensor:
    if training:
        raise _unsupported("dropout in training mode")
    return x


def _interpolate(x: QTensor, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                 align_corners: Any = None, recompute_scale_factor: Any = None,
                 antialias: bool = False) -> QTensor:
    if mode != "nearest":
        raise _unsupported(f"interpolate(mode={mode!r}) outside an nn.Upsample module")
    q = F.interpolate(x.q.to(torch.float32), size=size, scale_factor=scale_factor,
                      mode="nearest", recompute_scale_factor=recompute_scale_factor)
    return x._with(q.to(x.q.dtype), x.axis)


_HANDLERS = {
    "reshape": _reshape, "flatten": _flatten, "permute": _permute, "transpose": _transpose,
    "squeeze": _squeeze, "unsqueeze": _unsqueeze, "relu": _relu, "relu_": _relu,
    "max_pool2d": _max_pool2d, "_max_pool2d": _max_pool2d,
    "max_pool2d_with_indices": _max_pool2d, "dropout": _dropout, "interpolate": _interpolate,
    "view": lambda x, *shape: _reshape(x, _shape_arg(shape)),
    "chunk": _chunk, "split": _split, "repeat": _repeat, "expand": _expand, "pad": _pad,
    "adaptive_max_pool2d": _adaptive_max_pool2d, "contiguous": _identity, "clone": _identity,
    "detach": _identity,
}
