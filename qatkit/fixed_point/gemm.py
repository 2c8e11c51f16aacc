"""Which exact engine multiplies int8 by int8: ``torch._int_mm`` or float32.

Both give the same integers (spec section 12): ``_int_mm`` sums in int32, float32 sums
integers exactly while a static bound keeps every partial sum below 2^24. Which one is faster
depends on the machine: ``_int_mm`` runs oneDNN's VNNI/AMX kernels where the CPU has them and
a plain loop elsewhere (about 4 GOP/s on a 2-core AVX2 machine, 20x slower than float32 GEMM
there). ``QATKIT_INT8_GEMM`` (or :func:`set_int8_gemm`) chooses: ``auto`` (the default) times
both once per device type on a small GEMM and keeps the faster; ``int_mm`` or ``float32``
force one. Layers whose bound reaches 2^24 always take ``_int_mm`` (or float64, see
:func:`qatkit.fixed_point.kernels.conv_method`), whatever the choice.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import torch

from qatkit.base.errors import fail

ENGINES = ("auto", "int_mm", "float32")


def _checked(mode: str, source: str) -> str:
    if mode not in ENGINES:
        raise fail("QK000", f"{source}={mode!r} is not an int8 GEMM engine.",
                   f"use one of {', '.join(ENGINES)}")
    return mode


_mode = _checked(os.environ.get("QATKIT_INT8_GEMM", "auto"), "QATKIT_INT8_GEMM")
_probed: dict[str, str] = {}


def get_int8_gemm() -> str:
    return _mode


def set_int8_gemm(mode: str) -> None:
    """``"auto"``, ``"int_mm"`` or ``"float32"`` for int8 x int8 layers converted or first
    called from now on (a layer keeps the engine of its first call at an input scale)."""
    global _mode
    _mode = _checked(mode, "int8 GEMM engine")


@contextlib.contextmanager
def int8_gemm(mode: str) -> Iterator[None]:
    """``with int8_gemm("int_mm"): ...`` runs a block with one engine, then restores it."""
    old = _mode
    set_int8_gemm(mode)
    try:
        yield
    finally:
        set_int8_gemm(old)


def engine(device: torch.device) -> str:
    """The engine for int8 x int8 sums on ``device``: the forced one, or the faster one."""
    if _mode != "auto":
        return _mode
    if device.type != "cpu":  # CUDA's int8 tensor cores beat float32 without TF32
        return "int_mm"
    if "cpu" not in _probed:
        _probed["cpu"] = _probe()
    return _probed["cpu"]


def _best(fn: Callable[[], object], reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _probe(m: int = 2048, k: int = 288, n: int = 64) -> str:
    """Time one conv-sized GEMM (a 3x3x32 -> 64 conv over 2048 pixels) both ways."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g)
    bf = b.float()
    torch._int_mm(a, b)  # first calls outside the timing
    torch.mm(a.float(), bf)
    t_int = _best(lambda: torch._int_mm(a, b))
    t_f32 = _best(lambda: torch.mm(a.float(), bf))  # the cast is part of the float path
    return "float32" if t_f32 < t_int else "int_mm"
