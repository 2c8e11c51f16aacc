"""Checkpoints of prepared, calibrated, QAT and fixed-point models.

``save`` writes the state_dict (which carries the march and stage through the ``qatkit_meta``
submodule); ``load`` reads it with ``torch.load(weights_only=True)`` and turns every mismatch
into a clear error: another march (QK002) or another structure (QK000, with the keys that
differ).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from qatkit.base.errors import QatkitError, fail
from qatkit.base.modules import unwrap
from qatkit.quantization import meta


def save(model: nn.Module, path: str | os.PathLike) -> None:
    torch.save(unwrap(model).state_dict(), path)


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint written by :func:`save` (or ``torch.save(model.state_dict())``)."""
    return load_state(model, read(path))


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The state_dict in ``path`` (``torch.load(weights_only=True)``), or a clear error."""
    if not os.path.exists(path):
        raise fail("QK000", f"checkpoint {os.fspath(path)!r} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file
        raise fail("QK000", f"cannot read checkpoint {os.fspath(path)!r}: {e}",
                   "pass a file written by qatkit.checkpoint.save or "
                   "torch.save(model.state_dict())"
                   ) from None
    if not isinstance(state, dict):
        raise fail("QK000", "a checkpoint must hold a state_dict (a dict of tensors).")
    return state


def load_state(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    model = unwrap(model)
    if not isinstance(state, dict):
        raise fail("QK000", "a checkpoint must hold a state_dict (a dict of tensors).")
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
    except RuntimeError as e:
        raise fail("QK000", f"the checkpoint's tensors do not fit the model: {e}".split("\n")[0],
                   "build the same architecture with the same sizes") from None
    return model
