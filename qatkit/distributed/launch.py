"""DDP wrapping, rank-0 checkpoints and local multi-process runs (``spawn``).

``ddp`` checks on all ranks together that the model and its activation scales are identical
before wrapping it; ``save`` writes on rank 0 only (atomically) and every rank waits;
``spawn`` runs a function in fresh processes joined in a gloo process group over localhost.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from qatkit.base.errors import QatkitError, fail
from qatkit.distributed.calibration import (
    _check_qat,
    _rank,
    check_consistent,
    unwrap,
    world_size,
)
from qatkit.quantization.fake_quant import FakeQuantState, fake_quants, prepared_fake_quants

# ---- DDP and checkpoints -----------------------------------------------------------------------

def ddp(model: nn.Module, group: Any = None, **kwargs: Any
        ) -> nn.parallel.DistributedDataParallel:
    """Wrap a prepared (calibrated) QAT model in DistributedDataParallel after checking, on all
    ranks together, that they run the same model with bit-identical activation scales and that
    every activation scale is calibrated (fixed in QAT). ``kwargs`` go to DDP (e.g.
    ``device_ids=[local_rank]`` on GPUs)."""
    if world_size(group) == 1 and not (dist.is_available() and dist.is_initialized()):
        raise fail("QK000", "DistributedDataParallel needs an initialized process group.",
                   "launch with torchrun and call torch.distributed.init_process_group(backend)"
                   " first (gloo on CPU, nccl on GPU)")
    inner = unwrap(model)
    fqs = prepared_fake_quants(inner)
    check_consistent(inner, group)
    if any(fq.state is FakeQuantState.QAT for _, fq in fqs) and world_size(group) > 1:
        _check_qat(inner, [fq for _, fq in fqs])
    return nn.parallel.DistributedDataParallel(inner, process_group=group, **kwargs)


def save(model: nn.Module, path: str | os.PathLike, group: Any = None, run: str | None = None
         ) -> None:
    """Rank 0 writes ``qatkit.quantization.checkpoint.save(unwrap(model))`` (atomically); every
    rank waits, so all can :func:`load` it right after. Refused while still calibrating: the scales
    are not merged yet."""
    from qatkit.quantization import checkpoint
    inner = unwrap(model)
    if any(fq.state is FakeQuantState.CALIBRATION for _, fq in fake_quants(inner)) \
            and world_size(group) > 1:
        raise fail("QK004", "saving a checkpoint in CALIBRATION state with several processes: "
                   "rank 0's scales would come from its own shard only.",
                   "leave calibration first (qk.set_fake_quantize(model, VALIDATION) inside the "
                   "synchronized calibration) and save then")
    if _rank(group) == 0:
        checkpoint.save(inner, path, run=run)  # atomic
    if world_size(group) > 1:
        dist.barrier(group=group)


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """``qatkit.quantization.checkpoint.load`` into the unwrapped model (DDP's parameters are the
    module's), on every rank. Returns ``model``."""
    from qatkit.quantization import checkpoint
    checkpoint.load(unwrap(model), path)
    return model


# ---- local multi-process runs (demo, tests) -----------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., Any], nproc: int, *args: Any, backend: str = "gloo",
          threads: int | None = None, timeout_s: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``nproc`` fresh processes joined in a process group
    (``backend`` over a free localhost port) and return each rank's result; each process runs
    ``threads`` torch threads (default: the cores shared out among them). ``fn`` must be
    importable (a module-level function). A QatkitError in a worker is raised here."""
    import torch.multiprocessing as mp
    if nproc < 1:
        raise fail("QK000", f"nproc must be >= 1, got {nproc}.")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory(prefix="qatkit-spawn-") as d:
        try:
            mp.spawn(_worker, args=(nproc, _free_port(), backend, threads, timeout_s, d, fn,
                                    args), nprocs=nproc, join=True)
        except Exception as e:
            err = _worker_error(d, nproc)
            if err is not None:
                raise err from None
            raise RuntimeError(f"a worker process failed: {e}") from None
        out = []
        for r in range(nproc):
            with open(os.path.join(d, f"rank{r}.pkl"), "rb") as f:
                out.append(pickle.load(f))
        return out


def _worker(rank: int, world: int, port: int, backend: str, threads: int, timeout_s: float,
            d: str, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world, *args)
        _write(d, f"rank{rank}.pkl", result)
        # Leave together: a rank that tears down its gloo pairs while a peer's background
        # thread still reads from them makes that peer abort (SIGABRT, "connection closed").
        # Pairs that a timed-out collective already closed fail the barrier: nothing to wait for.
        with contextlib.suppress(RuntimeError):
            dist.barrier()
    except QatkitError as e:
        _write(d, f"error{rank}.pkl", (e.code, e.message, e.fix))
        raise
    finally:
        dist.destroy_process_group()


def _write(d: str, name: str, obj: Any) -> None:
    tmp = os.path.join(d, name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, os.path.join(d, name))


def _worker_error(d: str, nproc: int) -> QatkitError | None:
    for r in range(nproc):
        p = os.path.join(d, f"error{r}.pkl")
        if os.path.exists(p):
            with open(p, "rb") as f:
                code, message, fix = pickle.load(f)
            return QatkitError(code, f"(rank {r}) {message}", fix)
    return None


