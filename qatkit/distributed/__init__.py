"""Several processes: calibration that is exact across ranks, QAT under DDP, local spawning.

``calibration`` merges order-independent observer statistics over ``torch.distributed`` ranks
(it listens to the workflow's moments); ``launch`` wraps models in DDP, saves on rank 0 and
spawns local process groups. See docs/distributed.md.
"""

from qatkit.distributed.calibration import (
    calibrate,
    check_consistent,
    check_loader,
    shard,
    synchronized_calibration,
    synchronized_calibration_active,
    unwrap,
    world_size,
)
from qatkit.distributed.launch import ddp, load, save, spawn

__all__ = ["calibrate", "check_consistent", "check_loader", "ddp", "load", "save", "shard",
           "spawn", "synchronized_calibration", "synchronized_calibration_active", "unwrap",
           "world_size"]
