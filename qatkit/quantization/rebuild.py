"""Rebuild a prepared or fixed-point model from the float architecture and a checkpoint.

A qatkit checkpoint's metadata (``qatkit_meta._extra_state``) holds the march, the stage, the
declared processor and input source, and the *recipe* of ``prepare``: whether it fused and the
effective qconfig of every module. That is enough to redo what happened to the float model:

* ``load_prepared(float_model, path, example_inputs)``: ``prepare`` under the recorded march
  with the recorded qconfigs, then strict loading (calibrated or QAT checkpoints).
* ``load_quantized(float_model, path, example_inputs)``: the same prepared skeleton, one
  QAT-state forward of ``example_inputs`` (every fake quant gets a scale of the right shape),
  ``convert``, then strict loading of the fixed-point checkpoint. The skeleton's own integers
  and scales are all overwritten by the checkpoint; derived values (multipliers, shifts, lookup
  tables, kernel choice) are recomputed from the loaded ones, so the outputs are bit-identical
  to the saved model's.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn as nn

from qatkit.base.errors import QatkitWarning, fail
from qatkit.base.march import get_march, set_march
from qatkit.quantization import checkpoint, meta
from qatkit.quantization.convert import convert
from qatkit.quantization.prepare import prepare
from qatkit.quantization.qconfig import mapping_from_data


def _facts(state: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    facts = state.get(meta.META_NAME + "._extra_state")
    if not isinstance(facts, dict):
        raise fail("QK000", f"{os.fspath(path)!r} is a float checkpoint (no qatkit metadata).",
                   "load it with float_model.load_state_dict(torch.load(path)) and prepare")
    if not facts.get("recipe"):
        raise fail("QK000", f"{os.fspath(path)!r} was written by a qatkit without prepare "
                   "recipes in its metadata, so the prepared model cannot be rebuilt from "
                   "the float architecture.",
                   "prepare (and convert) the float model as before and use checkpoint.load")
    current = get_march()
    if current is not None and current.name != facts["march"]:
        raise fail("QK002", f"the checkpoint was made for march {facts['march']!r} but march "
                   f"{current.name!r} is set.", f"qk.set_march({facts['march']!r}) or unset it")
    return facts


def _prepared(float_model: nn.Module, example_inputs: Any, facts: dict[str, Any]
              ) -> nn.Module:
    recipe = facts["recipe"]
    with set_march(facts["march"]):
        return prepare(float_model, example_inputs, qconfig=mapping_from_data(recipe),
                       fuse=bool(recipe.get("fuse", True)), processor=facts.get("processor"),
                       input_source=facts.get("input_source"))


def _args(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) \
        else (example_inputs,)


def load_prepared(float_model: nn.Module, path: str | os.PathLike, example_inputs: Any
                  ) -> nn.Module:
    """The calibrated/QAT model saved in ``path``, rebuilt from ``float_model`` (an instance
    of the float architecture; its weights do not matter) and strictly loaded."""
    state = checkpoint.read(path)
    facts = _facts(state, path)
    if facts.get("stage") == "converted":
        raise fail("QK000", f"{os.fspath(path)!r} holds a fixed-point (converted) model.",
                   "use qk.load_quantized(float_model, path, example_inputs)")
    model = checkpoint.load_state(_prepared(float_model, example_inputs, facts), state)
    meta.get(model).recipe = facts["recipe"]  # where the qconfigs came from, as first prepared
    return model


def load_quantized(float_model: nn.Module, path: str | os.PathLike, example_inputs: Any
                   ) -> nn.Module:
    """The fixed-point model saved in ``path``, rebuilt from ``float_model`` alone."""
    state = checkpoint.read(path)
    facts = _facts(state, path)
    if facts.get("stage") != "converted":
        raise fail("QK000", f"{os.fspath(path)!r} holds a {facts.get('stage')} model, not a "
                   "fixed-point one.", "use qk.load_prepared(float_model, path, example_inputs)")
    skeleton = _prepared(float_model, example_inputs, facts)  # prepare works on a copy
    skeleton.train()  # QAT state: every fake quant takes a scale from the example (overwritten)
    with torch.no_grad():
        skeleton(*_args(example_inputs))
    skeleton.eval()
    with warnings.catch_warnings(), set_march(facts["march"]):
        # findings about the skeleton's throw-away scales are not about the checkpoint
        warnings.simplefilter("ignore", QatkitWarning)
        quantized = convert(skeleton, inplace=True)
    quantized = checkpoint.load_state(quantized, state)
    meta.get(quantized).recipe = facts["recipe"]
    return quantized
