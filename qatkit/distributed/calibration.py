"""Several processes: calibration that is exact across ranks, and QAT under DDP.

Built on ``torch.distributed`` (launched with ``torchrun``; gloo on CPU, NCCL on GPU). See
``docs/distributed.md``.

**Synchronized calibration** is explicit: ``qk.calibrate(model, shard, synchronize=True)`` or
``with qk.distributed.synchronized_calibration(model): ...``. Every rank must take part, because
leaving CALIBRATION then runs collectives (an implicit mode would hang a job that calibrates on
rank 0 only). Leaving CALIBRATION (``set_fake_quantize`` -> :func:`on_set_state`):

1. the ranks check that they run the same model set up the same way (a hash of march, stage and
   every fake quant's observer/dtype/state, all-gathered);
2. observers merge only order-independent statistics: ``min_val``/``max_val`` with MAX (min as
   ``-max(-x)``, exact), histogram grids to the largest exponent (``grow_to`` is exact), then
   ``count``, ``nonfinite`` and histogram bins summed as int64 (after a first merge, ranks
   other than 0 add only what they saw since, so calibrating in rounds counts samples once);
3. rank 0 computes every scale and broadcasts it, so scales are bit-identical everywhere and
   equal to one process calibrating on the union of the shards.

This happens before the guards run, so rules such as QK103 (NaN/Inf seen) judge the global
statistics and every rank decides the same. Order-dependent observers (moving average) and
observers with statistics qatkit cannot merge are refused with ``[QK004]``.

**QAT under DDP** needs calibrated activation scales: they stay fixed in QAT, weight scales come
from the weights that DDP keeps identical, so every rank uses the same scales at every step.
An activation fake quant that was never calibrated would follow its own rank's batches (DDP's
``broadcast_buffers`` only copies rank 0's observer into the others at the *next* forward, after
they used their own scale), so QAT with world size > 1 refuses it (``[QK004]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from qatkit.base import VERSION as __version__
from qatkit.base import hooks
from qatkit.base.errors import fail, silenced_reason
from qatkit.base.march import get_march
from qatkit.base.modules import unwrap
from qatkit.quantization import meta
from qatkit.quantization.calibrate import calibrate as calibrate_model
from qatkit.quantization.fake_quant import (
    FakeQuantize,
    FakeQuantState,
    fake_quants,
    prepared_fake_quants,
    set_fake_quantize,
)
from qatkit.quantization.observers import HistogramObserver, Observer

__all__ = [
    "calibrate", "check_consistent", "check_loader", "on_set_state", "shard",
    "synchronized_calibration", "synchronized_calibration_active", "unwrap", "world_size",
]

# Buffers of the observers whose merge this module knows; anything else cannot be synchronized.
_MERGEABLE = frozenset({"min_val", "max_val", "count", "nonfinite", "hist", "hist_exp"})
_ALTERNATIVE = ("calibrate with qk.default_calibration_qconfig() (observer 'mse'), or "
                "QuantSpec(observer='minmax' | 'percentile' | 'mse'): their statistics merge "
                "exactly across processes")


# ---- process group helpers -------------------------------------------------------------------

def world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (1 without an initialized process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _rank(group: Any = None) -> int:
    return dist.get_rank(group) if world_size(group) > 1 else 0


def _src(group: Any) -> int:
    """Global rank of the group's rank 0 (broadcast takes global ranks)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def _device(group: Any) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (and "cpu:gloo,cuda:nccl") takes CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(n: int, rank: int | None = None, world: int | None = None) -> range:
    """Indices ``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` samples, without
    padding: the shards are disjoint, cover all ``n`` and differ in size by at most one (some
    may be empty). Use ``torch.utils.data.Subset(dataset, shard(len(dataset)))`` instead of a
    ``DistributedSampler``, which pads by repeating samples. Defaults: this process's rank and
    the world size (0 and 1 without a process group)."""
    world = world_size() if world is None else world
    rank = _rank() if rank is None else rank
    if world < 1 or not 0 <= rank < world:
        raise fail("QK000", f"shard needs 0 <= rank < world, got rank={rank}, world={world}.")
    return range(rank * n // world, (rank + 1) * n // world)


# ---- consistency of the ranks -------------------------------------------------------------------

def _description(model: nn.Module, fqs: list[tuple[str, FakeQuantize]]) -> list[str]:
    """What must be the same on every rank (never the data or the statistics)."""
    m, cur = meta.get(model), get_march()
    lines = [f"qatkit {__version__}", f"prepared for march {m.march if m else None!r}",
             f"current march {cur.name if cur else None!r}",
             f"stage {m.stage if m else None!r}", f"{len(fqs)} fake quants"]
    for name, fq in fqs:
        obs = fq.observer
        params = {k: v for k, v in sorted(vars(obs).items()) if not k.startswith("_")
                  and k != "training" and isinstance(v, (bool, int, float, str, type(None)))}
        lines.append(f"fake quant {name!r}: {type(obs).__module__}.{type(obs).__qualname__}"
                     f"{params} dtype={fq.dtype} pow2={fq.pow2} weight={fq.is_weight} "
                     f"state={fq.state.name}")
    return lines


def _fingerprint(lines: list[str]) -> int:
    return int.from_bytes(hashlib.sha256("\n".join(lines).encode()).digest()[:8], "little",
                          signed=True)


def _check_same_setup(model: nn.Module, fqs: list[tuple[str, FakeQuantize]], group: Any,
                      what: str) -> None:
    """Collective: every rank raises the same QK004 error when the ranks differ."""
    world = world_size(group)
    lines = _description(model, fqs)
    mine = torch.tensor([_fingerprint(lines)], dtype=torch.int64, device=_device(group))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    if all(torch.equal(t, every[0]) for t in every):
        return
    # Rare path: fetch the descriptions to say what differs.
    descs: list[Any] = [None] * world
    dist.all_gather_object(descs, lines, group=group)
    ref = descs[0]
    for r, d in enumerate(descs[1:], 1):
        if d == ref:
            continue
        diff = next(((a, b) for a, b in zip(d, ref) if a != b), (len(d), len(ref)))
        raise fail("QK004", f"{what}: the {world} processes do not run the same model set up "
                   f"the same way: rank {r} has {diff[0]!r} where rank 0 has {diff[1]!r}. "
                   "Merged statistics and shared scales would mix different models.",
                   "build, prepare and configure the model identically on every rank (same "
                   "qk.set_march, qconfig and observers, same qatkit version); only the data "
                   "may differ between ranks")


def _check_mergeable(fqs: list[tuple[str, FakeQuantize]]) -> None:
    for name, fq in fqs:
        if fq.is_weight:
            continue
        obs = fq.observer
        if obs.order_dependent:
            raise fail("QK004", f"fake quant {name!r} uses {type(obs).__name__}, whose result "
                       "depends on the order of the batches (a moving average): no merge of "
                       "the processes' statistics equals calibrating on all the data in one "
                       "process, so synchronized calibration refuses it.", _ALTERNATIVE)
        extra = sorted({n for n, _ in obs.named_buffers()} - _MERGEABLE)
        if extra:
            raise fail("QK004", f"fake quant {name!r} uses {type(obs).__name__}, whose "
                       f"statistics {extra} qatkit does not know how to merge across "
                       "processes.", _ALTERNATIVE + ", or calibrate in one process")


def check_consistent(model: nn.Module, group: Any = None) -> None:
    """Collective: raise ``[QK004]`` on every rank unless all ranks run the same prepared model
    with bit-identical activation scales and calibration flags (weights are DDP's business).
    A no-op in one process."""
    if world_size(group) == 1:
        return
    inner = unwrap(model)
    fqs = fake_quants(inner)
    _check_same_setup(inner, fqs, group, "consistency check")
    acts = [(n, fq) for n, fq in fqs if not fq.is_weight]
    dev = _device(group)
    mine = torch.cat([torch.cat([fq.scale.detach().reshape(-1).to(torch.float64),
                                 fq.calibrated.reshape(1).to(torch.float64),
                                 fq.initialized.reshape(1).to(torch.float64)])
                      for _, fq in acts]).to(dev) if acts else torch.zeros(0, device=dev)
    ref = mine.clone()
    dist.broadcast(ref, _src(group), group=group)
    # torch.equal treats NaN != NaN; compare bit patterns instead.
    bad = [n for (n, fq), a, b in zip(acts, _split(mine, acts), _split(ref, acts))
           if not torch.equal(a.view(torch.int64), b.view(torch.int64))]
    flag = torch.tensor([len(bad)], dtype=torch.int64, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if int(flag) > 0:
        where = f": {bad[:3]}" if bad else " (on another rank)"
        raise fail("QK004", "the processes have different activation scales or calibration "
                   f"flags{where}; every rank would quantize differently.",
                   "calibrate on all ranks with qk.calibrate(model, shard, synchronize=True), "
                   "or load the same checkpoint on every rank (qk.distributed.load)")


def _split(flat: torch.Tensor, acts: list[tuple[str, FakeQuantize]]) -> list[torch.Tensor]:
    sizes = [fq.scale.numel() + 2 for _, fq in acts]
    return list(flat.cpu().split(sizes)) if sizes else []


# ---- synchronized calibration -------------------------------------------------------------------

@dataclass
class _Session:
    group: Any
    fq_ids: frozenset[int]
    timeout_s: float = 60.0
    failed: bool = False  # a rank's failure was announced: no more collectives


def sync_timeout_s() -> float:
    """How long a rank waits at a synchronization point of synchronized calibration for the
    others (``QATKIT_SYNC_TIMEOUT_S``, default 60 s) before failing, naming the late ranks."""
    try:
        return max(0.1, float(os.environ.get("QATKIT_SYNC_TIMEOUT_S", "60")))
    except ValueError:
        raise fail("QK000", "QATKIT_SYNC_TIMEOUT_S must be a number of seconds, got "
                   f"{os.environ['QATKIT_SYNC_TIMEOUT_S']!r}.", "e.g. QATKIT_SYNC_TIMEOUT_S=30"
                   ) from None


def _status(session: _Session, error: BaseException | None = None) -> None:
    """The rendezvous at each synchronization point: every rank arrives within the session's
    timeout (a gloo ``monitored_barrier`` that names the late ranks) and says whether it failed.
    A rank that failed calls this from its error path, meeting the others at their next
    synchronization point, so that every rank stops at once with an error naming it instead
    of waiting in a mismatched collective until torch's timeout. Collective."""
    group, rank = session.group, _rank(session.group)
    try:
        if dist.get_backend(group) == "gloo":
            dist.monitored_barrier(group=group, timeout=timedelta(seconds=session.timeout_s),
                                   wait_all_ranks=True)
        else:  # monitored_barrier is gloo's; other backends keep their own timeout
            dist.barrier(group=group)
    except RuntimeError as e:
        session.failed = True
        late = sorted({int(r) for r in re.findall(r"[Rr]anks?\s*:?\s*\[?([\d, ]+)", str(e))
                       for r in re.findall(r"\d+", r) if int(r) != rank}) or ["?"]
        if error is not None:
            return  # this rank's own error is the one to raise
        raise fail("QK004", f"synchronized calibration: rank {', '.join(map(str, late))} did not "
                   f"reach the synchronization point within {session.timeout_s:g} s (it failed, "
                   "hangs or calibrates far more data); this rank stops too.",
                   "look at that rank's own error; raise QATKIT_SYNC_TIMEOUT_S if its shard is "
                   "simply slower") from None
    mine = "" if error is None else f"{type(error).__name__}: {' '.join(str(error).split())}"
    every: list[Any] = [None] * world_size(group)
    dist.all_gather_object(every, mine, group=group)
    failed = [(r, m) for r, m in enumerate(every) if m]
    if failed:
        session.failed = True
        if error is None:
            r, m = failed[0]
            raise fail("QK004", f"synchronized calibration: rank {r} failed ({m[:300]}); every "
                       "rank stops, since the statistics cannot be merged without it.",
                       f"fix the error of rank {r} and start all ranks again")


_sessions: list[_Session] = []


def synchronized_calibration_active() -> bool:
    """True inside :func:`synchronized_calibration` (and ``calibrate(..., synchronize=True)``).
    Rule QK004 asks this before refusing calibration with world size > 1."""
    return bool(_sessions)


def _session_of(fqs: list[FakeQuantize]) -> _Session | None:
    for s in reversed(_sessions):
        if any(id(fq) in s.fq_ids for fq in fqs):
            return s
    return None


@contextlib.contextmanager
def synchronized_calibration(model: nn.Module, group: Any = None, timeout_s: float | None = None
                             ) -> Iterator[nn.Module]:
    """Calibrate ``model`` on every rank of ``group``, each on its own shard; leaving
    CALIBRATION inside the block merges the statistics and shares rank 0's scales.

    Every rank must enter the block (it checks that the ranks agree) and leave CALIBRATION in
    it; if the block ends while still in CALIBRATION, it switches to VALIDATION itself, so no
    rank can compute scales from its own shard afterwards. Pass the unwrapped model and call it
    directly: a DistributedDataParallel with ``broadcast_buffers`` copies rank 0's observer
    buffers over the other ranks' before forwards with gradients enabled. Yields the model.
    In one process the block is plain calibration.

    A rank that fails inside the block makes every rank fail at its next synchronization point
    with a QK004 error naming it; a rank that does not arrive within ``timeout_s`` (default
    :func:`sync_timeout_s`) is named the same way, instead of torch's 30-minute timeout."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and model.broadcast_buffers:
        raise fail("QK004", "synchronized calibration got a DistributedDataParallel with "
                   "broadcast_buffers=True: it copies rank 0's observer buffers over the other "
                   "ranks' statistics before forwards with gradients enabled.",
                   "calibrate ddp.module (calibration needs no gradient sync): "
                   "qk.calibrate(ddp.module, shard, synchronize=True)")
    inner = unwrap(model)
    fqs = prepared_fake_quants(inner)
    if world_size(group) > 1:
        _check_same_setup(inner, fqs, group, "synchronized calibration")
        _check_mergeable(fqs)  # same verdict on every rank: the setups are equal
    session = _Session(group, frozenset(id(fq) for _, fq in fqs),
                       sync_timeout_s() if timeout_s is None else float(timeout_s))
    _sessions.append(session)
    try:
        try:
            yield model
        except BaseException as e:  # tell the other ranks at their next synchronization point
            if world_size(group) > 1 and not session.failed:
                _status(session, e)
            raise
        if any(fq.state is FakeQuantState.CALIBRATION for _, fq in fqs):
            set_fake_quantize(inner, FakeQuantState.VALIDATION)
    finally:
        _sessions.remove(session)


def on_set_state(model: nn.Module, fqs: list[FakeQuantize], state: FakeQuantState) -> bool:
    """Called by ``set_fake_quantize`` with world size > 1, before the guards and before any
    state changes. Returns True when it made the scales of the fake quants leaving
    CALIBRATION (synchronized), so that they must not be recomputed from local statistics."""
    session = _session_of(fqs)
    if state is FakeQuantState.CALIBRATION:
        if _sessions and session is None:
            raise fail("QK004", "synchronized calibration is active for another model than the "
                       "one put in CALIBRATION.",
                       "pass this model to qk.distributed.synchronized_calibration(model)")
        return False
    leaving = [fq for fq in fqs if fq.state is FakeQuantState.CALIBRATION and not fq.is_weight]
    synced = False
    if leaving and session is not None:
        _status(session)
        _synchronize(model, leaving, session.group)
        synced = True
    if state is FakeQuantState.QAT:
        _check_qat(model, fqs)
    return synced


def _check_qat(model: nn.Module, fqs: list[FakeQuantize]) -> None:
    if silenced_reason(model, "QK004") is not None:
        return
    names = {id(m): n for n, m in model.named_modules()}
    loose = [names.get(id(fq), "?") for fq in fqs
             if not fq.is_weight and not fq.fixed and not bool(fq.calibrated)]
    if loose:
        more = f" and {len(loose) - 3} more" if len(loose) > 3 else ""
        raise fail("QK004", f"QAT in {world_size()} processes with activation fake quants that "
                   f"were never calibrated ({', '.join(map(repr, loose[:3]))}{more}): their "
                   "observers follow each rank's own batches, so the ranks would train with "
                   "different scales in the same step (DistributedDataParallel's "
                   "broadcast_buffers only copies rank 0's observers at the next forward).",
                   "calibrate first on every rank: qk.calibrate(calib, shard, synchronize=True) "
                   "and qat.load_state_dict(calib.state_dict()) (or qk.distributed.load a "
                   "calibration checkpoint); calibrated activation scales stay fixed in QAT. "
                   "If the ranks train independent models, qk.silence(model, 'QK004', reason)")


def _synchronize(model: nn.Module, fqs: list[FakeQuantize], group: Any) -> None:
    """Merge the statistics of ``fqs`` (activation fake quants in CALIBRATION) across ranks,
    then give every rank rank 0's scales. Collective."""
    names = {id(m): n for n, m in model.named_modules()}
    _check_same_setup(model, [(names.get(id(fq), "?"), fq) for fq in fqs], group,
                      "leaving synchronized calibration")
    dev = _device(group)
    _merge_statistics([fq.observer for fq in fqs], _rank(group), group, dev)
    _share_scales(fqs, group, dev)


_MERGED = "_qatkit_merged"  # observer.__dict__ key: the summed statistics of the last merge


def _merge_statistics(observers: list[Observer], rank: int, group: Any, dev: torch.device
                      ) -> None:
    """After a merge every rank holds the global statistics. A later merge (calibration
    continued, or a leave retried after a guard raised) must not add them again: ranks other
    than 0 then contribute only what they saw since (their sums minus the last merge's)."""
    hists = [o for o in observers if isinstance(o, HistogramObserver)]
    # 1) int64 MAX: grid exponents, and channel counts (an unseen per-channel observer still
    #    has scalar buffers, sized by its first batch).
    ints = torch.tensor([int(o.hist_exp) for o in hists] + [o.min_val.numel() for o in observers],
                        dtype=torch.int64, device=dev)
    dist.all_reduce(ints, op=dist.ReduceOp.MAX, group=group)
    exps, sizes = ints[:len(hists)].tolist(), ints[len(hists):].tolist()
    for o, n in zip(observers, sizes):
        if o.min_val.numel() != n:
            o.min_val = torch.full((n,), float("inf"), dtype=o.min_val.dtype,
                                   device=o.min_val.device)
            o.max_val = torch.full((n,), float("-inf"), dtype=o.max_val.dtype,
                                   device=o.max_val.device)
    # 2) MAX of max and of -min (negation is exact: min = -max(-x)); float64 holds any float.
    #    MIN/MAX are idempotent: merging again needs no care.
    ext = torch.cat([t.reshape(-1).to(torch.float64) for o in observers
                     for t in (o.max_val, -o.min_val)]).to(dev)
    dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=group)
    for o, (hi, neg_lo) in zip(observers, _pairs(ext.cpu(), observers)):
        o.max_val.copy_(hi.reshape(o.max_val.shape))
        o.min_val.copy_((-neg_lo).reshape(o.min_val.shape))
    # 3) one global grid (exact), then int64 SUM of counts and bins.
    for o, e in zip(hists, exps):
        o.grow_to(e)
    mine = [_sums(o) for o in observers]
    parts = []
    for o, v in zip(observers, mine):
        last = o.__dict__.get(_MERGED)
        if rank != 0 and last is not None and int(last[0][0]) <= int(v[0]):
            v = v - _on_grid(last, o)
        parts.append(v)
    total = torch.cat(parts).to(dev)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    total, off = total.cpu(), 0
    for o, v in zip(observers, mine):
        t = total[off:off + v.numel()]
        off += v.numel()
        o.count.fill_(int(t[0]))
        o.nonfinite.fill_(int(t[1]))
        if isinstance(o, HistogramObserver):
            o.hist.copy_(t[2:])
        o.__dict__[_MERGED] = (t.clone(), int(o.hist_exp) if isinstance(o, HistogramObserver)
                               else 0)


def _sums(o: Observer) -> torch.Tensor:
    """The summed statistics of ``o`` as one int64 vector: count, nonfinite, histogram bins."""
    head = torch.stack([o.count.reshape(()), o.nonfinite.reshape(())]).cpu()
    return torch.cat([head, o.hist.cpu()]) if isinstance(o, HistogramObserver) else head


def _on_grid(last: tuple[torch.Tensor, int], o: Observer) -> torch.Tensor:
    """The last merge's sums, with its histogram coarsened to ``o``'s current grid."""
    v, exp = last
    if not isinstance(o, HistogramObserver) or exp == int(o.hist_exp):
        return v
    h = HistogramObserver()
    h.hist.copy_(v[2:])
    h.hist_exp.fill_(exp)
    h.grow_to(int(o.hist_exp))  # the observer's own exact coarsening
    return torch.cat([v[:2], h.hist])


def _pairs(flat: torch.Tensor, observers: list[Observer]) -> list[tuple[torch.Tensor, ...]]:
    out, off = [], 0
    for o in observers:
        n = o.max_val.numel()
        out.append((flat[off:off + n], flat[off + n:off + 2 * n]))
        off += 2 * n
    return out


def _share_scales(fqs: list[FakeQuantize], group: Any, dev: torch.device) -> None:
    """Rank 0 computes the scales from the merged statistics; every rank takes them."""
    seen = [fq for fq in fqs if not fq.fixed and fq.observer.seen]
    flags = torch.tensor([int(fq.calibrated) for fq in fqs], dtype=torch.int64, device=dev)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)  # a rank may have had no data
    if _rank(group) == 0:
        for fq in seen:
            fq.update_scale()
        flat = torch.cat([fq.scale.detach().reshape(-1).to(torch.float64) for fq in seen]) \
            if seen else torch.zeros(0, dtype=torch.float64)
    else:  # per-tensor scales are scalars, per-channel ones have one value per channel
        flat = torch.zeros(sum(fq.observer.min_val.numel() for fq in seen), dtype=torch.float64)
    flat = flat.to(dev)
    dist.broadcast(flat, _src(group), group=group)
    flat, off = flat.cpu(), 0
    for fq in seen:
        shape = fq.observer.min_val.shape
        s = flat[off:off + shape.numel()].reshape(shape).to(torch.float32)
        off += shape.numel()
        if fq.scale.shape != shape:  # the first per-channel scale sizes the buffer
            fq.scale = s.to(fq.scale.device)
        else:
            fq.scale.copy_(s)
        fq.initialized.fill_(1)
    for fq, f in zip(fqs, flags.tolist()):
        fq.calibrated.fill_(f)
        fq.mark_synchronized()


def check_loader(data: Iterable[Any]) -> None:
    """Refuse a DataLoader whose DistributedSampler pads its shards with repeated samples:
    the repeated samples would be counted twice in the merged statistics."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    if not isinstance(data, DataLoader):
        return
    bs = getattr(data, "batch_sampler", None)
    for sampler in (data.sampler, getattr(bs, "sampler", None)):
        if not isinstance(sampler, DistributedSampler):
            continue
        n = len(sampler.dataset)  # type: ignore[arg-type]
        if not sampler.drop_last and sampler.total_size > n:
            raise fail("QK004", f"the calibration DataLoader uses a DistributedSampler that pads "
                       f"{n} samples to {sampler.total_size} by repeating "
                       f"{sampler.total_size - n}: merged statistics would count those samples "
                       "twice.", "give each rank Subset(dataset, qk.distributed.shard(len("
                       "dataset))) (disjoint shards, no padding; uneven shards are fine), or "
                       "DistributedSampler(..., drop_last=True) to calibrate on all but the "
                       "last few samples")


def calibrate(model: nn.Module, data: Iterable[Any], progress: bool = False,
              group: Any = None, timeout_s: float | None = None) -> nn.Module:
    """``qk.calibrate(model, data, synchronize=True)`` over the ranks of ``group``: each rank
    calibrates on its ``data`` (its shard); the statistics are merged. Takes a DDP model too
    (its ``.module`` is calibrated directly, without DDP's buffer broadcasts)."""
    inner = unwrap(model)
    with synchronized_calibration(inner, group, timeout_s):
        calibrate_model(inner, data, progress)
    return model


# ---- listening to the workflow (qatkit.base.hooks) ---------------------------------------------

_opened: dict[int, contextlib.ExitStack] = {}  # id(model) -> session opened by calibration_start


@hooks.on("calibration_start")
def _calibration_start(model: nn.Module, data: Iterable[Any], synchronize: bool) -> None:
    check_loader(data)  # a padding DistributedSampler would count samples twice
    fqs = [fq for _, fq in prepared_fake_quants(model)]
    if synchronize and _session_of(fqs) is None:
        stack = contextlib.ExitStack()
        stack.enter_context(synchronized_calibration(model))
        _opened[id(model)] = stack


@hooks.on("calibration_batches")
def _calibration_batches(model: nn.Module, batches: int) -> int | None:
    session = _session_of([fq for _, fq in fake_quants(model)])
    if session is None or world_size(session.group) == 1:
        return None
    _status(session)  # a rank that failed in its calibration loop says so here
    # collective: an empty shard is fine, no data on any rank is not
    t = torch.tensor([batches], dtype=torch.int64, device=_device(session.group))
    dist.all_reduce(t, group=session.group)
    return int(t)


@hooks.on("calibration_stop")
def _calibration_stop(model: nn.Module) -> None:
    stack = _opened.pop(id(model), None)
    if stack is not None:  # called from calibrate's finally: pass on the error, if any
        stack.__exit__(*sys.exc_info())


@hooks.on("fake_quant_state")
def _fake_quant_state(model: nn.Module, fake_quants: list[FakeQuantize], state: FakeQuantState,
                      wrapper: nn.Module) -> bool | None:
    if world_size() == 1:
        return None
    return on_set_state(model, fake_quants, state) or None
