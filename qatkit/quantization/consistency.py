"""Consistency levels (``nash-e``/``nash-m``): power-of-two scales so training and deployment
agree more closely.

======  ==========================================  ====================================
level   activation scales                           weight scales (per output channel)
======  ==========================================  ====================================
0       statistical (section 2 of the spec)         statistical
1       rounded up to a power of two                statistical
2       rounded up to a power of two                rounded up to a power of two
======  ==========================================  ====================================

Rounding up (``s -> 2^ceil(log2 s)``, :func:`qatkit.base.quant_math.pow2_ceil`) never clips
more than the statistical scale and costs at most one bit of resolution. With power-of-two
scales the requantization multipliers ``s_a / s_o`` (add, cat, pooling, ...) are powers of two
at level 1, and at level 2 also the conv/linear multipliers ``s_in * s_w[c] / s_o``: section 4's
multiply-and-shift is then exactly a rounding shift (spec section 18). Levels 1 and 2 need
calibration and QAT at that level (a statistical scale loaded into a level-1 model is refused).

``qk.set_consistency_level(1)`` applies to every later ``prepare`` (also usable as ``with``);
``QuantSpec(pow2=True)`` asks for it per tensor. Either is refused (QK002) on a march without
consistency levels.
"""

from __future__ import annotations

import contextlib

from qatkit.base.errors import fail
from qatkit.base.march import March, get_march
from qatkit.quantization.qconfig import QConfig, QuantSpec

LEVELS = (0, 1, 2)
_level = 0


class _LevelSetting(contextlib.AbstractContextManager):
    def __init__(self, previous: int) -> None:
        self.previous = previous

    def __exit__(self, *exc: object) -> None:
        global _level
        _level = self.previous


def set_consistency_level(level: int) -> _LevelSetting:
    """Set the consistency level (0, 1 or 2) for later ``prepare`` calls; refused (QK002)
    when the march set now lacks it (checked again at ``prepare``)."""
    global _level
    if level not in LEVELS or isinstance(level, bool):
        raise fail("QK000", f"consistency level must be 0, 1 or 2, got {level!r}.",
                   "qk.set_consistency_level(1) (power-of-two activation scales)")
    march = get_march()
    if march is not None:
        check(march, level)
    previous, _level = _level, int(level)
    return _LevelSetting(previous)


def get_consistency_level() -> int:
    """The consistency level later ``prepare`` calls apply (0 unless set)."""
    return _level


def check(march: March, level: int) -> None:
    if level not in march.consistency_levels:
        with_levels = "nash-e, nash-m"
        raise fail("QK002", f"march {march.name} has no consistency level {level} (its levels: "
                   f"{', '.join(map(str, march.consistency_levels))}); power-of-two scales are "
                   f"a mode of {with_levels}.",
                   "qk.set_consistency_level(0), or target nash-e/nash-m")


def _pow2(spec: QuantSpec | None) -> QuantSpec | None:
    # a fixed scale that is not a power of two is refused by FakeQuantize
    return spec if spec is None or spec.pow2 else spec.with_(pow2=True)


def apply(qconfigs: dict[str, QConfig | None], march: March, level: int | None = None
          ) -> dict[str, QConfig | None]:
    """``qconfigs`` with power-of-two activation (level >= 1) and weight (level 2) specs;
    refuses the level, or a ``QuantSpec(pow2=True)``, on a march without it (QK002)."""
    level = _level if level is None else level
    if level:
        check(march, level)
    elif not march.pow2_scales and len(march.consistency_levels) == 1 and any(
            s is not None and s.pow2 for q in qconfigs.values() if q is not None
            for s in (q.activation, q.weight)):
        check(march, 1)
    if not level:
        return qconfigs
    out: dict[str, QConfig | None] = {}
    for name, q in qconfigs.items():
        if q is None:
            out[name] = None
            continue
        w = _pow2(q.weight) if level >= 2 else q.weight
        out[name] = QConfig(_pow2(q.activation), w, q.high_precision_output)
    return out


__all__ = ["LEVELS", "apply", "check", "get_consistency_level", "set_consistency_level"]
