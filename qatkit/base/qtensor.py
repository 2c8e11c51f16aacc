"""QTensor: the integer values and scale that flow through a fixed-point model.

A QTensor stands for ``q * scale`` (``docs/fixed-point.md`` section 1). It is not a
``torch.Tensor``: shape-only operations (view, reshape, flatten, permute, ...), ReLU, max pooling,
dropout and nearest resizing work on it because they move integers without changing them; any
other torch function raises a clear error, because in the fixed-point model every
value-changing op needs a calibrated output scale (rules QK008/QK102).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from qatkit.base.errors import fail


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

    def __add__(self, other: Any) -> QTensor:
        raise _unsupported("'+' (use a FloatFunctional: self.add = FloatFunctional(); "
                           "self.add.add(x, y))")

    __radd__ = __iadd__ = __add__

    def __mul__(self, other: Any) -> QTensor:
        raise _unsupported("'*' (use a FloatFunctional's mul or mul_scalar)")

    __rmul__ = __imul__ = __mul__

    def __sub__(self, other: Any) -> QTensor:
        raise _unsupported("'-' (use a FloatFunctional's sub)")

    __rsub__ = __isub__ = __sub__

    # ---- torch functions ------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        handler = _HANDLERS.get(name)
        if handler is None:
            raise _unsupported(f"torch function {name!r}")
        return handler(*args, **kwargs)


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
}
