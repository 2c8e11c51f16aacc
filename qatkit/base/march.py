"""The march table: every BPU architecture, the processors that use it, what it can run.

Which operators a march lacks is a fact of each operator: ``qatkit.quantization.registry``.

A march ("micro-architecture") decides which dtypes and operators compile and whether scales
must be powers of two. ``set_march`` accepts a march or a processor name and works as a context
manager; ``prepare`` refuses to run without one (rule QK002). The setting is per thread and
per ``contextvars`` context: two threads preparing for different marches never mix them.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

from qatkit.base.errors import fail


@dataclass(frozen=True)
class March:
    """Capabilities of one BPU architecture (from the vendor's public documentation)."""

    name: str
    processors: tuple[str, ...]
    activation_dtypes: tuple[str, ...]
    weight_dtypes: tuple[str, ...]
    high_precision_output: str  # dtype of a conv/linear output that feeds only DeQuantStubs
    pow2_scales: bool = False
    # every dtype the GEMM engine can output at high precision (default: high_precision_output)
    high_precision_dtypes: tuple[str, ...] = ()
    # consistency levels (0: statistical scales; 1: power-of-two activation scales; 2: and
    # power-of-two weight scales), see qatkit.base.consistency
    consistency_levels: tuple[int, ...] = (0,)
    max_rank: int | None = None
    max_add_channels: int | None = None
    notes: str = ""

    def supports_dtype(self, dtype: str) -> bool:
        return dtype in self.activation_dtypes

    def supports_weight_dtype(self, dtype: str) -> bool:
        return dtype in self.weight_dtypes

    @property
    def high_precision_outputs(self) -> tuple[str, ...]:
        return self.high_precision_dtypes or (self.high_precision_output,)


_INT = ("qint8", "qint16")
_J6_FLOAT_HP = ("float32", "float16")  # J6B/H/P tensor engine: float outputs

MARCHES: dict[str, March] = {m.name: m for m in (
    March("bernoulli", ("X2", "J2"), ("qint8",), ("qint8",), "qint32", pow2_scales=True,
          max_rank=4,
          notes="power-of-two scales 2^-shift, shift in [1, 14]"),
    March("bernoulli2", ("X3", "J3", "RDK X3"), ("qint8",), ("qint8",), "qint32", max_rank=4,
          max_add_channels=2048,
          notes="int8 only (int32 high-precision conv output), 4-D tensors only, no clamp"),
    March("bayes", ("J5", "RDK Ultra"), _INT, ("qint8",), "qint32",
          notes="int8 and int16 activations; lookup-table nonlinearities"),
    March("bayes-e", ("RDK X5",), _INT, ("qint8",), "qint32",
          notes="int8 and int16 activations; lookup-table nonlinearities"),
    March("nash-e", ("J6E", "RDK S100"), _INT, _INT, "qint32", consistency_levels=(0, 1, 2),
          notes="int8/int16 ops and weights; int32 add only fused into a conv; "
                "consistency levels 1, 2 (power-of-two scales)"),
    March("nash-m", ("J6M", "RDK S100P"), _INT, _INT, "qint32", consistency_levels=(0, 1, 2),
          notes="int8/int16 ops and weights; int32 add only fused into a conv; "
                "consistency levels 1, 2 (power-of-two scales)"),
    March("nash-h", ("J6H",), (*_INT, "float16"), _INT, "float32",
          high_precision_dtypes=_J6_FLOAT_HP,
          notes="everything but GEMMs may run in float16; float16/float32 GEMM output"),
    March("nash-p", ("J6P", "RDK S600"), (*_INT, "float16"), _INT, "float32",
          high_precision_dtypes=_J6_FLOAT_HP,
          notes="everything but GEMMs may run in float16; float16/float32 GEMM output"),
    March("nash-b-lite", ("J6B-Lite",), _INT, ("qint8",), "float32",
          high_precision_dtypes=_J6_FLOAT_HP,
          notes="int8/int16 ops, int8 weights; float16/float32 GEMM output"),
    March("nash-b", ("J6B",), _INT, _INT, "float32", high_precision_dtypes=_J6_FLOAT_HP,
          notes="int8/int16 ops and weights; float16/float32 GEMM output"),
    March("nash-b-plus", ("J6B-Plus",), _INT, _INT, "float32",
          high_precision_dtypes=_J6_FLOAT_HP,
          notes="int8/int16 ops and weights; float16/float32 GEMM output"),
)}

PROCESSORS: dict[str, str] = {
    p.upper(): m.name for m in MARCHES.values() for p in m.processors
}

# The march of this thread / asyncio context: threads never see each other's setting (each
# thread starts with none). A model keeps the march it was prepared for (qatkit_meta).
_current: contextvars.ContextVar[March | None] = contextvars.ContextVar("qatkit_march",
                                                                         default=None)


def _valid_names() -> str:
    procs = ", ".join(f"{p}->{m}" for p, m in sorted(PROCESSORS.items()))
    return f"marches: {', '.join(MARCHES)}; processors: {procs}"


def resolve(march: str | March | None = None, processor: str | None = None) -> March:
    """Find a march by march name or processor name (case-insensitive)."""
    if isinstance(march, March):
        return march
    if march is not None and processor is not None:
        want = resolve(processor=processor)
        got = resolve(march)
        if want.name != got.name:
            raise fail("QK002", f"march {got.name!r} is not the march of processor "
                       f"{processor!r} (which needs {want.name!r}); the model would fail to "
                       "compile or deploy with a different accuracy.",
                       f"qk.set_march({want.name!r})")
        return got
    key = march if march is not None else processor
    if not isinstance(key, str) or not key.strip():
        raise fail("QK002", "no march or processor given.", f"name one of the {_valid_names()}")
    k = key.strip()
    if k.lower() in MARCHES:
        return MARCHES[k.lower()]
    if k.upper() in PROCESSORS:
        return MARCHES[PROCESSORS[k.upper()]]
    raise fail("QK002", f"unknown march or processor {key!r}.", f"use one of the {_valid_names()}")


class _MarchSetting(contextlib.AbstractContextManager):
    def __init__(self, previous: March | None) -> None:
        self.previous = previous

    def __exit__(self, *exc: object) -> None:
        _current.set(self.previous)


def set_march(march: str | March | None = None, *, processor: str | None = None
              ) -> _MarchSetting:
    """Set the target march for prepare/convert: ``set_march("nash-e")`` or
    ``set_march(processor="J6E")``. Also usable as ``with qk.set_march(...):``."""
    previous = _current.get()
    _current.set(resolve(march, processor))
    return _MarchSetting(previous)


def get_march(required: bool = False) -> March | None:
    """The march set by :func:`set_march` (None, or QK002 when ``required``, if none is)."""
    current = _current.get()
    if required and current is None:
        raise fail("QK002", "no march is set, so qatkit cannot know which dtypes, operators and "
                   "scale rules the target processor has.",
                   "call qk.set_march('nash-e') or qk.set_march(processor='J6E') before prepare")
    return current


@contextlib.contextmanager
def no_march() -> Iterator[None]:
    """Run with no march set (used by tests and the doctor)."""
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)
