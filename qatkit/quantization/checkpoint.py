"""Checkpoints of prepared, calibrated, QAT and fixed-point models.

``save`` writes the state_dict atomically (it carries the march and stage through the
``qatkit_meta`` submodule); ``load`` reads it with ``torch.load(weights_only=True)`` and
turns every mismatch into a clear error: another march (QK002) or another structure (QK000,
with the keys that differ). ``load_run`` refuses a directory mixing files of several runs.

A state_dict carries torch's per-module metadata (``state_dict()._metadata``: each module's
``_version``), which modules read when loading (``local_metadata["version"]``: BatchNorm's
format, torchvision's MNASNet refuses a state without it). Every copy made here keeps it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from qatkit.base.errors import QatkitError, fail
from qatkit.base.files import atomic_open
from qatkit.base.modules import unwrap
from qatkit.quantization import meta

RUN_KEY = "_qatkit_run"  # the run a checkpoint belongs to (several files of one run)


def save(model: nn.Module, path: str | os.PathLike, run: str | None = None) -> None:
    """Write ``model``'s state_dict to ``path`` atomically (the old file survives an
    interruption). ``run``: an id recorded in the file, so that :func:`load_run` refuses a
    directory whose files come from different runs."""
    if not isinstance(model, nn.Module):
        raise fail("QK000", f"checkpoint.save needs an nn.Module, got {type(model).__name__}.",
                   "pass the model itself")
    state = unwrap(model).state_dict()
    if run is not None:
        state[RUN_KEY] = str(run)
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def _without_run(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the run id, keeping torch's per-module ``_metadata`` (versions)."""
    out: dict[str, Any] = OrderedDict((k, v) for k, v in state.items() if k != RUN_KEY)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _read(path: str | os.PathLike) -> dict[str, Any]:
    if not isinstance(path, (str, os.PathLike)):
        raise fail("QK000", f"a checkpoint path must be a str or os.PathLike, got "
                   f"{type(path).__name__}.", "pass the file name")
    if os.path.isdir(path):
        raise fail("QK000", f"checkpoint {os.fspath(path)!r} is a directory.",
                   "pass the .pt file inside it (or use checkpoint.load_run for a --save DIR)")
    if not os.path.exists(path):
        raise fail("QK000", f"checkpoint {os.fspath(path)!r} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt, truncated or foreign file
        raise fail("QK000", f"cannot read checkpoint {os.fspath(path)!r}: "
                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                   "pass a file written by qatkit.checkpoint.save or "
                   "torch.save(model.state_dict())"
                   ) from None


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint written by :func:`save` (or ``torch.save(model.state_dict())``)."""
    if not isinstance(model, nn.Module):
        raise fail("QK000", f"checkpoint.load needs an nn.Module, got {type(model).__name__}.",
                   "build (and prepare/convert) the model, then load into it")
    return load_state(model, _read(path))


def load_run(directory: str | os.PathLike, models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Load ``DIR/NAME.pt`` into each ``models[NAME]`` (a ``qatkit demo --save DIR``), refusing
    a directory whose files were written by different runs (an interrupted run leaves its new
    files beside an old run's)."""
    states = {name: _read(os.path.join(directory, name + ".pt")) for name in models}
    runs = {name: s.get(RUN_KEY) if isinstance(s, dict) else None for name, s in states.items()}
    if len(set(runs.values())) > 1:
        raise fail("QK000", f"the checkpoints in {os.fspath(directory)!r} come from different "
                   f"runs ({', '.join(f'{n}.pt: {r}' for n, r in runs.items())}); an "
                   "interrupted run mixed them.", "run `qatkit demo --save DIR` again")
    return {name: load_state(models[name], states[name]) for name in models}


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The state_dict in ``path`` (``torch.load(weights_only=True)``, without the run id), or a
    clear error."""
    state = _read(path)
    if not isinstance(state, dict):
        raise fail("QK000", "a checkpoint must hold a state_dict (a dict of tensors).")
    return _without_run(state)


def load_state(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    model = unwrap(model)
    if not isinstance(state, dict):
        raise fail("QK000", "a checkpoint must hold a state_dict (a dict of tensors).")
    state = _without_run(state)
    have, want = set(model.state_dict()), set(state)
    key = meta.META_NAME + "._extra_state"
    if key in state and key not in have:
        raise fail("QK000", "the checkpoint is of a prepared/converted model but the model is a "
                   "float model.", "prepare (and convert) the model the same way first")
    m = meta.get(model)
    if key in state and m is not None:
        m.set_extra_state(state[key])  # raises QK002 on another march
        stage = state[key].get("stage")
        if (stage == "converted") != (m.stage == "converted"):
            raise fail("QK000", f"the checkpoint is of a {stage} model but the model is "
                       f"{m.stage}.", "load fixed-point checkpoints into qk.convert(...) models "
                       "and QAT/calibration checkpoints into prepared models")
    missing, unexpected = sorted(have - want), sorted(want - have)
    if missing or unexpected:
        raise fail("QK000", "the checkpoint does not match the model's structure: "
                   f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                   f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.",
                   "build and prepare the same model (same qconfig and march) before loading")
    own = model.state_dict()
    casts = [k for k, v in state.items() if isinstance(v, torch.Tensor)
             and isinstance(own.get(k), torch.Tensor) and v.dtype != own[k].dtype]
    if casts:  # load_state_dict would cast silently (int16 weights into int8 slots...)
        k = casts[0]
        raise fail("QK000", f"the checkpoint's {k!r} is {state[k].dtype} but the model holds "
                   f"{own[k].dtype} there; loading would cast the values silently.",
                   "build the model with the same qconfig (dtypes) the checkpoint was made with")
    try:
        model.load_state_dict(state)
    except QatkitError:
        raise
    except (RuntimeError, ValueError) as e:
        if getattr(state, "_metadata", None) is None:  # e.g. MNASNet: "version None ..."
            raise fail("QK000", f"loading the checkpoint failed ({str(e).splitlines()[0]}) and "
                       "it has no module versions (torch's state_dict()._metadata, lost when "
                       "a state_dict is copied into a plain dict).",
                       "save with qk.save(model, path) or torch.save(model.state_dict(), "
                       "path), without copying the state_dict") from None
        if isinstance(e, ValueError):
            raise
        raise fail("QK000", f"the checkpoint's tensors do not fit the model: {e}".split("\n")[0],
                   "build the same architecture with the same sizes") from None
    return model
