"""float16 rounding, the overflow refusal and a GEMM's float16 output (``docs/fixed-point.md``
section 19), below the fixed-point modules that use them (``float16.py``, ``modules.py``).

Rounding float64 to float16 is done here, not by ``Tensor.to(torch.float16)``: PyTorch's CPU
conversion from float64 goes through float32 and rounds twice (a float64 just above a float16
tie becomes the tie in float32 and then rounds to even). :func:`f16` rounds to float32 *to odd*
first, which makes the second rounding the correct one (24 >= 11 + 2 bits).
"""

from __future__ import annotations

import torch

from qatkit.base.errors import fail
from qatkit.base.quant_math import along

F16_MAX = 65504.0  # the largest finite float16


def f16(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64) rounded once to float16, round to nearest even, as IEEE 754."""
    x = x.to(torch.float64)
    y = x.to(torch.float32)  # nearest; then toward zero where it rounded away
    y = torch.where(y.to(torch.float64).abs() > x.abs(), torch.nextafter(y, torch.zeros_like(y)),
                    y)
    inexact = y.to(torch.float64) != x
    bits = y.view(torch.int32)
    y = torch.where(inexact & ~torch.isnan(x), bits | 1, bits).view(torch.float32)  # to odd
    return y.to(torch.float16)


def check_finite(y: torch.Tensor, who: str) -> torch.Tensor:
    """Refuse (QK103) a float16 result beyond the float16 range (inf) or NaN."""
    if not bool(torch.isfinite(y).all()):
        raise overflow_error(y, who)
    return y


def overflow_error(y: torch.Tensor, who: str) -> Exception:
    n_inf = int(torch.isinf(y).sum())
    n_nan = int(torch.isnan(y).sum())
    return fail("QK103", f"{who} runs in float16 and {n_inf} of its results exceed the float16 "
                f"range (|x| >= 65520 rounds to inf; the largest float16 is {F16_MAX:g})"
                + (f" and {n_nan} are NaN" if n_nan else "") + ": float16 would not hold them "
                "on the chip either, and saturating them would be silently wrong.",
                "give this operator an integer qconfig (QuantSpec('qint16') has a calibrated "
                "range), or scale its inputs down")


def gemm_output(acc: torch.Tensor, acc_scale: torch.Tensor, axis: int, activation: str | None,
                who: str) -> torch.Tensor:
    """A conv/linear with float16 output: its accumulator (int, bias included) times the
    accumulator scale, in float64, rounded once to float16; a fused ReLU/ReLU6 after that
    (exact: it selects or clamps float16 values)."""
    y = f16(acc.to(torch.float64) * along(acc_scale.to(torch.float64), axis, acc.dim()))
    if activation == "relu":
        y = torch.clamp_min(y, 0)
    elif activation == "relu6":
        y = torch.clamp(y, 0, 6)
    return check_finite(y, who)
