"""QK004: calibration on several devices.

Three ways in:

* ``set_fake_quantize(model, CALIBRATION)`` runs :func:`_check` (stage "calibration") with the
  model as passed (``ctx.extra["wrapper"]``): a ``nn.DataParallel`` is refused, as is a
  torch.distributed world size > 1 unless qatkit's synchronized calibration is active.
* Every calibration forward of a fake quant calls :func:`forward_error`: a DataParallel replica
  (``_is_replica``; its buffer updates are thrown away), or a process group that appeared (or
  grew) after the state was set.
* The input QuantStub's calibration hook calls :func:`inside_data_parallel`: a model wrapped in
  DataParallel or DistributedDataParallel *after* the state was set. Without GPUs DataParallel
  calls the module directly, so only the call stack shows the wrapper.

Rank 0 calibrating alone in a torch.distributed job (the unwrapped model, the other ranks
waiting, e.g. at a barrier) is legitimate (docs/distributed.md, and the vendor's recommended
practice): it is not refused. A rank other than 0 calibrating without synchronization is
refused: either every rank calibrates its own shard (unsynchronized multi-rank calibration),
or the one calibrating process is not the one whose scales a DDP job keeps. No collective is
run to find out (it would hang the legitimate case), so in the every-rank case rank 0 proceeds
and the job fails on the other ranks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch.nn as nn

from qatkit.base.errors import QatkitError, fail
from qatkit.base.modules import world_size
from qatkit.doctor.rules import Context, Finding, Rule

_DP_MSG = ("calibration is running inside torch.nn.DataParallel: observer updates on its "
           "replicas are thrown away after every forward (on CPU it merely calls the model), "
           "so on GPUs calibration silently learns nothing.")
_DP_FIX = ("calibrate the unwrapped model on one device: qk.set_fake_quantize(model, "
           "FakeQuantState.CALIBRATION) and model(x) without DataParallel")
_DP_CODES = frozenset({nn.DataParallel.forward.__code__})
_DDP_CODES = frozenset({nn.parallel.DistributedDataParallel.forward.__code__})
_DDP_MSG = ("calibration is running through torch.nn.parallel.DistributedDataParallel: with "
            "broadcast_buffers=True it copies rank 0's buffers, observers included, over the "
            "other ranks' before every forward, so only rank 0's data count and the other "
            "ranks' statistics are silently overwritten.")
_DDP_FIX = ("calibrate the unwrapped model (ddp.module): on rank 0 alone, or on every rank with "
            "qk.calibrate(ddp.module, shard, synchronize=True); wrap in DDP for QAT afterwards")


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def synchronized() -> bool:
    """True when qatkit's synchronized calibration (``qatkit.distributed.calibration``) is
    active."""
    from qatkit.distributed.calibration import synchronized_calibration_active
    return synchronized_calibration_active()


def _world_message(n: int, rank: int) -> str:
    return (f"calibration is running in {n} torch.distributed processes without qatkit's "
            f"synchronized calibration, on rank {rank}: each process would calibrate on its "
            "own shard, and DistributedDataParallel broadcasts rank 0's buffers every "
            "forward, so only one shard counts and the ranks may end up with different "
            "scales.")


_WORLD_FIX = ("run the calibration on every rank with qk.calibrate(model, shard, "
              "synchronize=True) (docs/distributed.md), or calibrate in one process: before "
              "init_process_group, or on rank 0 alone with the unwrapped model while the other "
              "ranks wait (then qd.save / load the result)")


def _check(ctx: Context) -> Iterator[Finding]:
    state = ctx.extra.get("state")
    if ctx.stage != "calibration" or (state is not None and state.name != "CALIBRATION"):
        return
    wrapper = ctx.extra.get("wrapper", ctx.model)
    if isinstance(wrapper, nn.DataParallel) or getattr(ctx.model, "_is_replica", False):
        yield RULE.finding("", _DP_MSG, fix=_DP_FIX)
        return
    if isinstance(wrapper, nn.parallel.DistributedDataParallel):
        yield RULE.finding("", _DDP_MSG, fix=_DDP_FIX)
        return
    n = world_size()
    if n > 1 and not synchronized() and _rank() != 0:  # rank 0 alone: legitimate
        yield RULE.finding("", _world_message(n, _rank()), fix=_WORLD_FIX)


def forward_error(fq: Any) -> QatkitError | None:
    """Called by every fake quant in a calibration forward; cheap when all is well."""
    if getattr(fq, "_is_replica", False):
        return fail(RULE.code, _DP_MSG, _DP_FIX)
    n = world_size()
    # set_fake_quantize already accepted (or the user silenced) the world it saw; only a
    # process group created or resized since then is new.
    if n > 1 and n != fq.calibration_world and not synchronized() and _rank() != 0:
        return fail(RULE.code, _world_message(n, _rank()), _WORLD_FIX)
    return None


def inside_data_parallel() -> str | None:
    """"dp"/"ddp" when a DataParallel/DistributedDataParallel forward is on the call stack
    (the model was wrapped after ``set_fake_quantize``), else None. Compares code objects
    only: no frame locals are built."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code in _DP_CODES:
            return "dp"
        if f.f_code in _DDP_CODES:
            return "ddp"
        f = f.f_back
    return None


def runtime_finding(stub_name: str, wrapper: str = "dp") -> Finding:
    msg, fix = (_DDP_MSG, _DDP_FIX) if wrapper == "ddp" else (_DP_MSG, _DP_FIX)
    return RULE.finding("", msg + f" (seen at the input QuantStub {stub_name!r})", fix=fix)


RULE = Rule(
    code="QK004",
    name="multi-device-calibration",
    severity="error",
    stages=("calibration",),
    summary=(
        "Refuses calibration on several devices: the CALIBRATION state set on (or run "
        "through) a torch.nn.DataParallel or DistributedDataParallel, and calibration on a "
        "rank other than 0 of a torch.distributed job unless qatkit's synchronized "
        "calibration is active. Rank 0 calibrating the unwrapped model alone while the other "
        "ranks wait is legitimate and not refused."),
    why=(
        "Calibration statistics live in observer buffers. DataParallel runs replicas whose "
        "buffer updates are discarded after each forward, so the observers learn nothing. "
        "DistributedDataParallel broadcasts rank 0's buffers every forward, so only rank 0's "
        "shard counts (and histogram statistics are never merged). Either way the scales are "
        "not those of the calibration data, and nothing fails loudly."),
    bad="""
calib = qk.prepare(Net(), x, qconfig=qk.default_calibration_qconfig())
dp = nn.DataParallel(calib)                 # on GPUs: nn.DataParallel(calib.cuda())
qk.set_fake_quantize(dp, qk.FakeQuantState.CALIBRATION)  # [QK004] ... DataParallel ...
with torch.no_grad():
    for xb, _ in train_batches[:8]:
        dp(xb)
""",
    good="""
calib = qk.prepare(Net(), x, qconfig=qk.default_calibration_qconfig())
# One process, one device. In a torchrun job every rank calibrates its own shard and the
# statistics are merged (without a process group: rank 0 of 1, every batch).
shard = [train_batches[i] for i in qk.distributed.shard(8)]
qk.calibrate(calib, shard, synchronize=True)
quantized = qk.convert(calib)
""",
    fix="calibrate in one process on one device (QAT may use DataParallel/DDP afterwards)",
    check=_check,
)
