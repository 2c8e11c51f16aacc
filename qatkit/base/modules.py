"""Small helpers on modules that every layer needs: unwrap a parallel wrapper, replace a
submodule by its qualified name, the device of a model, the torch.distributed world size."""

from __future__ import annotations

import torch
import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel`` / ``DistributedDataParallel`` (else ``model``)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    for keep in ("qconfig", "_qatkit_silenced"):  # user settings travel with the module
        if hasattr(old, keep) and not hasattr(new, keep):
            setattr(new, keep, getattr(old, keep))
    setattr(parent, child, new)


def device_of(model: nn.Module) -> torch.device:
    """The device of the first parameter (or buffer) of ``model``; CPU when it has none."""
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


def world_size() -> int:
    """The torch.distributed world size (1 without an initialized process group)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()
