"""Wall-clock timing and peak-memory measurement.

Timing: :func:`measure` calls a zero-argument function ``warmup`` times untimed, then at least
``repeats`` times (more, up to ``max_repeats``, while the timed total is under ``min_time_s``),
each call timed with ``time.perf_counter``. :func:`measure_interleaved` does the same for several
functions in alternating rounds, which is what to use for ratios on a shared machine. Compare
ratios measured in one run, never absolute times across runs.

Peak memory: :func:`peak_memory` runs the workload in a FRESH Python process, because the usual
in-process tools are unsound for PyTorch: ``tracemalloc`` sees only Python's allocator (tensor
storage comes from C++ ``malloc``), and ``/proc/self/status`` VmHWM or ``ru_maxrss`` are
process-lifetime high-water marks, so an earlier, bigger step of the same process hides the
measured one. In the child, after the setup (model, data, optimizer built) and glibc
``malloc_trim(0)`` (so memory the setup freed cannot be silently reused), the Linux peak-RSS
counter is reset by writing ``5`` to ``/proc/self/clear_refs``; the result is VmHWM after the
call minus VmRSS just before it: the extra resident memory the call needed at its peak
(including memory it keeps, e.g. gradients created by a first backward). Where ``clear_refs``
cannot be written, the child falls back to ``ru_maxrss`` after minus the high-water mark before
the call, a lower bound, and says so in ``method``.

The child runs with glibc's mmap threshold fixed at its default, 128 KiB
(``MALLOC_MMAP_THRESHOLD_``). By default glibc raises the threshold to the size of each
mmapped block freed, after which tensors up to 32 MiB come from the brk heap, whose freed
space stays resident: the same call then measured 50-190 MiB in identical runs (the exact
model's convert + first forward of resnet18_like at batch 8), set by the heap's history, not
by what the call holds. With the threshold fixed, every tensor above 128 KiB is its own
mapping, returned when freed, so the peak is that of the memory the call really holds (runs
agree within a few MiB). It applies to every measured entry alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["measure", "measure_interleaved", "peak_memory"]

#: glibc's default mmap threshold, held fixed in the peak_memory child (see module docstring)
MMAP_THRESHOLD = 128 * 1024


def measure(
    fn: Callable[[], object],
    warmup: int = 2,
    repeats: int = 5,
    *,
    min_time_s: float = 0.0,
    max_repeats: int = 200,
) -> dict[str, Any]:
    """Time ``fn()``: ``{"median_s", "min_s", "all"}`` (``all``: every timed call, in seconds).

    At least ``repeats`` timed calls; if ``min_time_s`` is given, calls continue until their total
    reaches it (at most ``max_repeats``), which steadies very short workloads.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_time_s and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _summary(times)


def _summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "all": times}


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int = 2,
    rounds: int = 5,
    *,
    min_time_s: float = 0.0,
    max_repeats: int = 200,
    budget_s: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Time several functions in alternation, so that load from other processes (a shared
    machine) falls on all of them alike and their ratios stay meaningful.

    Each function is called ``warmup`` times untimed, then ``rounds`` rounds run every function
    in turn, ``k`` timed calls each: ``k = 1``, or (with ``min_time_s`` and ``warmup >= 1``) enough
    calls for about ``min_time_s`` per function over all rounds, judged from the last warm-up
    call, at most ``max_repeats`` in all. With ``budget_s``, no new round starts once the timed
    rounds have taken that long (at least two rounds run), which bounds a run on a loaded machine.
    Returns ``{name: measure()-style dict}``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    per_round: dict[str, int] = {}
    for name, fn in fns.items():
        elapsed = 0.0
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        k = 1
        if warmup and min_time_s > 0:
            k = math.ceil(min_time_s / rounds / max(elapsed, 1e-9))
        per_round[name] = max(1, min(k, max_repeats // rounds))
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for done in range(rounds):
        if budget_s is not None and done >= 2 and time.perf_counter() - start > budget_s:
            break
        for name, fn in fns.items():
            for _ in range(per_round[name]):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: _summary(ts) for name, ts in times.items()}


# ----------------------------------------------------------------------------- peak memory

_CHILD = r"""
import json, sys
request = json.loads(sys.stdin.read())
sys.path[:0] = [p for p in request["sys_path"] if p not in sys.path]
from bench.timing import _child_main
print("\n" + json.dumps(_child_main(request)))
"""


def _status_kib() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def _resolve(target: str) -> Callable[..., Any]:
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc), so the setup's garbage cannot be reused."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _child_main(request: dict[str, Any]) -> dict[str, Any]:
    factory = _resolve(request["target"])
    fn = factory(*request["args"])
    for _ in range(request["warmup"]):
        fn()
    gc.collect()
    _release_free_heap()
    if os.path.exists("/proc/self/status") and _reset_hwm():
        before = _status_kib()["VmRSS"] * 1024
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        peak = _status_kib()["VmHWM"] * 1024
        method = "clear_refs+VmHWM, mmap threshold " + os.environ.get(
            "MALLOC_MMAP_THRESHOLD_", "dynamic")
    else:
        before = _ru_maxrss_bytes()
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        peak = _ru_maxrss_bytes()
        method = "ru_maxrss (lower bound)"
    return {
        "peak_delta_bytes": max(peak - before, 0),
        "baseline_rss_bytes": before,
        "peak_rss_bytes": peak,
        "call_s": wall,
        "method": method,
    }


def _target_name(factory: Callable[..., Any]) -> str:
    module = factory.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None or not spec.name:
            raise ValueError("peak_memory needs a factory importable by module name, not __main__")
        module = spec.name
    qualname = factory.__qualname__
    if "<" in qualname:
        raise ValueError(f"peak_memory needs a module-level factory, got {qualname!r}")
    return f"{module}:{qualname}"


def peak_memory(
    factory: Callable[..., Callable[[], object]],
    *args: Any,
    warmup: int = 0,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Peak extra resident memory of one call, measured in a fresh Python process.

    ``factory`` must be a module-level function (imported by name in the child) and ``args``
    JSON-serialisable; the child calls ``fn = factory(*args)`` (setup, not measured), then ``fn()``
    ``warmup`` times, then measures one ``fn()``. Returns ``{"peak_delta_bytes",
    "baseline_rss_bytes", "peak_rss_bytes", "call_s", "method"}``.
    """
    request = {
        "target": _target_name(factory),
        "args": list(args),
        "warmup": warmup,
        "sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
    }
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env=env,
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"peak_memory child for {request['target']} failed ({proc.returncode}):\n"
            f"{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])
