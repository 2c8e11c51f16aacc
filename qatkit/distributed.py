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
import pickle
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from qatkit.errors import QatkitError, fail, silenced_reason
from qatkit.fake_quant import FakeQuantize, FakeQuantState, fake_quants, prepared_fake_quants
from qatkit.observers import HistogramObserver, Observer

__all__ = [
    "calibrate", "check_calibration_allowed", "check_consistent", "check_loader", "ddp", "load",
    "on_set_state", "run_demo", "save", "shard", "sharded_accuracy", "spawn",
    "synchronized_calibration", "synchronized_calibration_active", "train_ddp", "unwrap",
    "world_size",
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


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


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
    from qatkit import __version__, meta
    from qatkit.march import get_march
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
def synchronized_calibration(model: nn.Module, group: Any = None) -> Iterator[nn.Module]:
    """Calibrate ``model`` on every rank of ``group``, each on its own shard; leaving
    CALIBRATION inside the block merges the statistics and shares rank 0's scales.

    Every rank must enter the block (it checks that the ranks agree) and leave CALIBRATION in
    it; if the block ends while still in CALIBRATION, it switches to VALIDATION itself, so no
    rank can compute scales from its own shard afterwards. Pass the unwrapped model and call it
    directly: a DistributedDataParallel with ``broadcast_buffers`` copies rank 0's observer
    buffers over the other ranks' before forwards with gradients enabled. Yields the model.
    In one process the block is plain calibration."""
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
    session = _Session(group, frozenset(id(fq) for _, fq in fqs))
    _sessions.append(session)
    try:
        yield model
        if any(fq.state is FakeQuantState.CALIBRATION for _, fq in fqs):
            from qatkit.fake_quant import set_fake_quantize
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
        fq._dirty = False


def check_calibration_allowed(fq: FakeQuantize) -> None:
    """Raise ``[QK004]`` when a calibration forward of ``fq`` may not run here: a DataParallel
    replica, or world size > 1 without synchronized calibration. (Kept for callers written
    before rule QK004 took these checks over: ``qatkit.rules.qk004_multi_device_calibration``.)"""
    from qatkit.rules import qk004_multi_device_calibration as qk004
    if getattr(fq, "_is_replica", False):
        raise fail("QK004", qk004._DP_MSG, qk004._DP_FIX)
    n = world_size()
    if n > 1 and not synchronized_calibration_active():
        raise fail("QK004", qk004._world_message(n), qk004._WORLD_FIX)


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
              group: Any = None) -> nn.Module:
    """``qk.calibrate(model, data, synchronize=True)``: calibration of ``model`` on this rank's
    ``data`` (its shard), merged over all ranks of ``group``. Takes a DDP model too (its
    ``.module`` is calibrated directly, without DDP's buffer broadcasts)."""
    from qatkit.calibrate import _calibrate
    inner = unwrap(model)
    check_loader(data)
    with synchronized_calibration(inner, group):
        _calibrate(inner, data, progress, batches_of_all=_total_batches(group))
    return model


def _total_batches(group: Any) -> Callable[[int], int]:
    def total(local: int) -> int:  # collective: an empty shard is fine, no data at all is not
        if world_size(group) == 1:
            return local
        t = torch.tensor([local], dtype=torch.int64, device=_device(group))
        dist.all_reduce(t, group=group)
        return int(t)
    return total


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


def save(model: nn.Module, path: str | os.PathLike, group: Any = None) -> None:
    """Rank 0 writes ``qatkit.checkpoint.save(unwrap(model))`` (atomically); every rank waits,
    so all can :func:`load` it right after. Refused while still calibrating: the scales are not
    merged yet."""
    from qatkit import checkpoint
    inner = unwrap(model)
    if any(fq.state is FakeQuantState.CALIBRATION for _, fq in fake_quants(inner)) \
            and world_size(group) > 1:
        raise fail("QK004", "saving a checkpoint in CALIBRATION state with several processes: "
                   "rank 0's scales would come from its own shard only.",
                   "leave calibration first (qk.set_fake_quantize(model, VALIDATION) inside the "
                   "synchronized calibration) and save then")
    if _rank(group) == 0:
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        checkpoint.save(inner, tmp)
        os.replace(tmp, path)
    if world_size(group) > 1:
        dist.barrier(group=group)


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """``qatkit.checkpoint.load`` into the unwrapped model (DDP's parameters are the module's),
    on every rank. Returns ``model``."""
    from qatkit import checkpoint
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
    (``backend`` over a free localhost port) and return each rank's result. ``fn`` must be
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
    except QatkitError as e:
        _write(d, f"error{rank}.pkl", (e.code, e.message, e.fix))
        raise
    finally:
        dist.destroy_process_group()
    _write(d, f"rank{rank}.pkl", result)


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


def sharded_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     batch_size: int = 500, group: Any = None) -> float:
    """Test accuracy with each rank evaluating its shard; correct counts are summed (exact)."""
    from qatkit.demo import centered
    idx = shard(len(y), _rank(group), world_size(group))
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(idx.start, idx.stop, batch_size):
            j = min(i + batch_size, idx.stop)
            correct += int((model(centered(x[i:j])).argmax(1) == y[i:j]).sum())
    t = torch.tensor([correct], dtype=torch.int64)
    if world_size(group) > 1:
        t = t.to(_device(group))
        dist.all_reduce(t, group=group)
    return int(t) / len(y)


def train_ddp(model: nn.Module, split: Any, epochs: int, lr: float, seed: int,
              batch_size: int = 64, step_hook: Callable[[], None] | None = None
              ) -> list[float]:
    """The demo's SGD training under DDP: every step, the global batch that one process would
    draw (same permutation) is split across the ranks, and each rank's summed loss is scaled
    by ``world / global_batch`` so DDP's gradient average equals the one-process gradient of
    the global batch (up to float summation order). Returns the mean loss of each epoch."""
    import torch.nn.functional as F

    from qatkit import data
    from qatkit.demo import centered
    rank, world = _rank(), world_size()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    losses = []
    for ep in range(epochs):
        model.train()
        total = torch.zeros(2, dtype=torch.float64)
        for xb, yb in data.batches(split.x_train, split.y_train, batch_size, shuffle=True,
                                   seed=seed + ep):
            part = shard(len(yb), rank, world)
            x, y = xb[part.start:part.stop], yb[part.start:part.stop]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(centered(x)), y, reduction="sum")
            (loss * (world / len(yb))).backward()
            opt.step()
            if step_hook is not None:
                step_hook()
            total += torch.tensor([float(loss.detach()), len(y)], dtype=torch.float64)
        sched.step()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total[0] / total[1].clamp_min(1)))
    return losses


def _demo_worker(rank: int, world: int, dataset: str, march: str, qat_epochs: int, seed: int,
                 float_path: str, save_dir: str | None, work: str) -> dict[str, Any]:
    import qatkit as qk
    from qatkit import demo
    torch.manual_seed(seed)
    split = demo.load(dataset, seed)
    example = demo.centered(split.x_train[:2])
    with qk.set_march(march):
        float_model = demo.DemoNet(split.num_classes)
        float_model.load_state_dict(torch.load(float_path, weights_only=True))

        calib = qk.prepare(float_model, example, qconfig=qk.default_calibration_qconfig())
        cal_x = split.x_train[:1024]  # the single-process demo's calibration set, sharded
        part = shard(len(cal_x), rank, world)
        batches = [demo.centered(cal_x[i:min(i + 128, part.stop)])
                   for i in range(part.start, part.stop, 128)]
        calibrate(calib, batches)
        calib_acc = sharded_accuracy(qk.convert(calib), split.x_test, split.y_test)

        qat = qk.prepare(float_model, example, qconfig=qk.default_qat_qconfig())
        qat.load_state_dict(calib.state_dict())
        qat.train()
        qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
        model = ddp(qat)
        train_ddp(model, split, qat_epochs, lr=1e-3, seed=seed + 1000)
        qat.eval()
        qk.set_fake_quantize(qat, qk.FakeQuantState.VALIDATION)
        check_consistent(qat)
        qat_acc = sharded_accuracy(qat, split.x_test, split.y_test)
        quantized = qk.convert(qat)
        quant_acc = sharded_accuracy(quantized, split.x_test, split.y_test)

        # Checkpoints come from rank 0; every rank loads the QAT one back to prove they load.
        out = save_dir or work
        if rank == 0 and save_dir:
            os.makedirs(save_dir, exist_ok=True)
        save(float_model, os.path.join(out, "float.pt"))
        save(calib, os.path.join(out, "calibrated.pt"))
        save(qat, os.path.join(out, "qat.pt"))
        save(quantized, os.path.join(out, "quantized.pt"))
        back = qk.prepare(float_model, example, qconfig=qk.default_qat_qconfig())
        load(back, os.path.join(out, "qat.pt"))
        mine, ref = back.state_dict(), qat.state_dict()
        same = all(torch.equal(mine[k], ref[k]) for k in ref if isinstance(ref[k], torch.Tensor))
    return {"calibration_accuracy": calib_acc, "qat_accuracy": qat_acc,
            "quantized_accuracy": quant_acc, "checkpoint_loaded": same,
            "threads": torch.get_num_threads()}


def run_demo(args: Any) -> dict[str, Any]:
    """``qatkit demo --nproc N``: float training in this process (as the one-process demo),
    then calibration (synchronized, disjoint shards of the same calibration set) and DDP QAT
    in N spawned gloo processes. Returns the one-process demo's fields plus ``nproc``,
    ``backend`` and ``checkpoint_loaded_on_all_ranks``."""
    import time

    import qatkit as qk
    from qatkit import demo
    t0 = time.perf_counter()
    nproc, seed = int(args.nproc), int(args.seed)
    quiet = bool(getattr(args, "json", False))
    torch.manual_seed(seed)
    split = demo.load(args.dataset, seed)
    epochs, qat_epochs = demo.default_epochs(args.dataset, args.epochs, args.qat_epochs)
    march = qk.march.resolve(args.march).name
    with qk.set_march(march):
        float_model = demo.DemoNet(split.num_classes)
        demo.train_float(float_model, split, epochs, seed, quiet)
        float_acc = demo.accuracy(float_model, split.x_test, split.y_test)
    with tempfile.TemporaryDirectory(prefix="qatkit-demo-") as work:
        float_path = os.path.join(work, "float_weights.pt")
        torch.save(float_model.state_dict(), float_path)
        results = spawn(_demo_worker, nproc, args.dataset, march, qat_epochs, seed,
                        float_path, args.save, work)
    r0 = results[0]
    return {
        "dataset": split.name, "march": march, "float_accuracy": float_acc,
        "calibration_accuracy": r0["calibration_accuracy"],
        "qat_accuracy": r0["qat_accuracy"], "quantized_accuracy": r0["quantized_accuracy"],
        "quantized_minus_float": r0["quantized_accuracy"] - float_acc, "epochs": epochs,
        "qat_epochs": qat_epochs, "train_size": len(split.y_train),
        "test_size": len(split.y_test), "seed": seed, "torch": torch.__version__,
        "threads": r0["threads"], "seconds": round(time.perf_counter() - t0, 2),
        "nproc": nproc, "backend": "gloo",
        "checkpoint_loaded_on_all_ranks": all(r["checkpoint_loaded"] for r in results),
    }
