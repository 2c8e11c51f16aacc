"""Announce the forwards of prepared and converted models (moments ``model_forward`` and
``fixed_point_forward`` of :mod:`qatkit.base.hooks`).

``prepare`` and ``convert`` call :func:`announce`: a forward pre-hook on the model's root that
emits one moment per forward the user runs (traces and comparison recorders are watching, not
running: they are skipped). The cost is one attribute lookup and one emit per forward, not per
layer. Each prepared model gets a lineage number; ``convert`` works on a deep copy, so the
fixed-point model of a QAT model carries its number: listeners can tell "this QAT model was
evaluated in fixed point" from "some fixed-point model ran somewhere".
"""

from __future__ import annotations

import itertools
from typing import Any

import torch.nn as nn

from qatkit.base import hooks, recorder

_lineages = itertools.count(1)


def lineage(model: nn.Module) -> int | None:
    """The lineage number of a prepared model and of the fixed-point models made from it."""
    return model.__dict__.get("_qatkit_lineage")


def announce(model: nn.Module, fixed_point: bool) -> None:
    """Emit ``model_forward`` (prepared) or ``fixed_point_forward`` (converted) per forward."""
    from qatkit.quantization.fake_quant import FakeQuantize
    d = model.__dict__
    if not fixed_point or "_qatkit_lineage" not in d:
        d["_qatkit_lineage"] = next(_lineages)
    if fixed_point:
        d.pop("_qatkit_probe", None)
    else:  # one activation fake quant tells the state: set_fake_quantize sets them all
        d["_qatkit_probe"] = next((m for m in model.modules() if isinstance(m, FakeQuantize)
                                   and not m.is_weight), None)
    d["_qatkit_fixed_point"] = fixed_point
    if not d.get("_qatkit_announces"):
        d["_qatkit_announces"] = True
        model.register_forward_pre_hook(_pre_forward)


def _pre_forward(model: nn.Module, args: tuple) -> None:
    if recorder.active() is not None:
        return
    d = model.__dict__
    if d.get("_qatkit_fixed_point"):
        hooks.emit("fixed_point_forward", model=model)
        return
    probe: Any = d.get("_qatkit_probe")
    state = getattr(probe, "state", None)
    if state is not None:
        hooks.emit("model_forward", model=model, training=model.training, state=state)
