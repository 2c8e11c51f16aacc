"""Dtype ranges, scale computation and (fake) quantization: the one place where scales are made.

Fake quant (QAT) and convert (fixed point) both call :func:`scale_from_amax` and
:func:`quantize`, so the scale a QAT model trains with is bit for bit the scale the fixed-point
model uses. See ``docs/fixed-point.md`` sections 2 and 3.
"""

from __future__ import annotations

import torch

QRANGE: dict[str, tuple[int, int]] = {
    "qint8": (-128, 127),
    "qint16": (-32768, 32767),
    "qint32": (-(2**31), 2**31 - 1),
}
TORCH_DTYPE = {"qint8": torch.int8, "qint16": torch.int16, "qint32": torch.int32}
MIN_SCALE = 2.0**-40


def qrange(dtype: str) -> tuple[int, int]:
    try:
        return QRANGE[dtype]
    except KeyError:
        from qatkit.base.errors import fail
        raise fail("QK000", f"unknown quantized dtype {dtype!r}.",
                   f"use one of {', '.join(QRANGE)}") from None


def scale_from_amax(amax: torch.Tensor, dtype: str = "qint8", pow2: bool = False
                    ) -> torch.Tensor:
    """``s = amax / ((qmax - qmin) / 2)`` in float32 (int8: amax / 127.5), at least 2^-40;
    on power-of-two marches rounded up to ``2^-shift`` with shift in [1, 14]."""
    qmin, qmax = qrange(dtype)
    s = (amax.to(torch.float32) / ((qmax - qmin) / 2)).clamp_min(MIN_SCALE)
    if pow2:
        shift = torch.floor(-torch.log2(s)).clamp(1, 14)
        s = torch.exp2(-shift)
    return s


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ``>= s`` (``s > 0``), exactly: with ``s = f * 2^e`` and
    ``0.5 <= f < 1`` it is ``2^(e-1)`` when ``f == 0.5`` (``s`` is one already), else ``2^e``.
    Rounding the scale up never clips more than the statistical scale did. Used by the
    consistency levels 1 and 2 (``qatkit.quantization.consistency``)."""
    f, e = torch.frexp(s.to(torch.float32))
    return torch.ldexp(torch.ones_like(f), torch.where(f == 0.5, e - 1, e)).to(torch.float32)


def is_pow2(s: torch.Tensor) -> bool:
    """Every element of ``s`` is a positive power of two."""
    f, _ = torch.frexp(s.to(torch.float32))
    return bool(((f == 0.5) & (s > 0)).all())


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: str, axis: int | None = None
             ) -> torch.Tensor:
    """``sat(round_half_even(x / s))`` with the division in float32; returns int64."""
    qmin, qmax = qrange(dtype)
    s = along(scale, axis, x.dim())
    return torch.round(x.to(torch.float32) / s).clamp_(qmin, qmax).to(torch.int64)


def along(t: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


class _FakeQuant(torch.autograd.Function):
    """round(x / s).clamp(qmin, qmax) * s, straight-through gradient inside the range."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax):  # type: ignore[override]
        xs = x / scale
        inside = (xs >= qmin - 0.5) & (xs <= qmax + 0.5)
        ctx.save_for_backward(inside)
        return torch.round(xs).clamp_(qmin, qmax).mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, dtype: str, axis: int | None = None
                  ) -> torch.Tensor:
    """Fake quantization with vectorised tensor ops (no ATen scalar-loop kernels)."""
    qmin, qmax = qrange(dtype)
    s = along(scale, axis, x.dim())
    if not x.requires_grad:
        return torch.round(x / s).clamp_(qmin, qmax).mul_(s)
    return _FakeQuant.apply(x, s, qmin, qmax)
