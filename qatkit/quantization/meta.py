"""The facts of a prepared or converted model, recorded in the model and its checkpoints.

``prepare``/``convert`` add a ``qatkit_meta`` submodule holding the march, the stage, the
declared target processor and input source, and (after convert) the module structure of the
fixed-point model. Its extra state (march, stage, processor, input source, qatkit version)
travels in ``state_dict``; loading a checkpoint of another march raises QK002.

The meta module is also where ``model.train()``/``model.eval()`` of a prepared model is heard
(it is one child of the root): a change of mode is announced as the moment ``train_mode``, since
it changes what the fake quants do (QAT under ``eval()`` validates).

The metadata is a child module so that it travels in ``state_dict`` (key
``qatkit_meta._extra_state``) and through ``deepcopy``/``torch.save``. A container that calls
all its children in order (a top-level ``nn.Sequential``) calls it too: calling it hands the
value through unchanged, without running forward hooks, so the data flow (and a trace of it) is
exactly that of the model without it.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from qatkit.base import VERSION, hooks
from qatkit.base.errors import fail
from qatkit.base.modules import unwrap

META_NAME = "qatkit_meta"


class QatkitMeta(nn.Module):
    """``march``, ``stage`` ("prepared" | "converted"), ``processor`` and ``input_source`` as
    declared to ``prepare``; ``structure``: qualified name -> module type of the fixed-point
    model as ``convert`` made it (ops added later are not in it)."""

    def __init__(self, march: str, stage: str, processor: str | None = None,
                 input_source: str | None = None) -> None:
        super().__init__()
        self.march, self.stage = march, stage
        self.processor, self.input_source = processor, input_source
        self.structure: dict[str, type] = {}
        self.loaded_stage: str | None = None
        # how prepare was called (qconfig per module, fuse), enough to prepare the float
        # architecture again when loading a checkpoint (qatkit.quantization.checkpoint)
        self.recipe: dict[str, Any] = {}

    def train(self, mode: bool = True) -> QatkitMeta:
        was = self.training
        super().train(mode)
        root = self.__dict__.get("_root")  # not a submodule: a plain reference to the model
        if root is not None and was != mode:
            hooks.emit("train_mode", model=root, training=mode)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"march": self.march, "stage": self.stage, "processor": self.processor,
                "input_source": self.input_source, "qatkit": VERSION, "recipe": self.recipe}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        march = state.get("march") if isinstance(state, dict) else None
        if march != self.march:
            raise fail("QK002", f"the checkpoint was made for march {march!r} but this model is "
                       f"prepared for {self.march!r}; scales and dtypes would not match the "
                       "target processor.",
                       f"load it into a model prepared under qk.set_march({march!r}), or "
                       "re-calibrate for the new march")
        self.loaded_stage = state.get("stage")
        for key in ("processor", "input_source"):
            if getattr(self, key) is None and state.get(key) is not None:
                setattr(self, key, state[key])
        if not self.recipe and state.get("recipe"):
            self.recipe = state["recipe"]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Called only by containers that run every child (nn.Sequential): the identity, and
        # invisible to hooks, so traces and observers see the model as the user wrote it.
        if len(args) == 1 and not kwargs:
            return args[0]
        raise fail("QK000", "qatkit_meta holds the model's facts (march, stage); it is not a "
                   "layer and takes exactly one value to hand through.",
                   "do not call model.qatkit_meta")

    forward = __call__

    def extra_repr(self) -> str:
        return f"march={self.march!r}, stage={self.stage!r}"


def attach(model: nn.Module, march: str, stage: str, processor: str | None = None,
           input_source: str | None = None) -> QatkitMeta:
    old = get(model)
    if old is not None:  # convert keeps what prepare recorded
        processor = processor or old.processor
        input_source = input_source or old.input_source
    m = QatkitMeta(march, stage, processor, input_source)
    if old is not None:
        m.recipe = old.recipe
    m.training = model.training
    setattr(model, META_NAME, m)
    m.__dict__["_root"] = model
    if not model.__dict__.get("_qatkit_state_guard"):
        model.__dict__["_qatkit_state_guard"] = True
        model.register_load_state_dict_pre_hook(refuse_float_state)
    return m


def refuse_float_state(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                       *args: Any) -> None:
    """Load-state pre-hook of prepared and converted models: a state_dict without qatkit
    metadata is a float model's, and its keys name the same slots (``conv1.weight``...) that
    hold BN-folded float weights (prepared) or integer weights (converted) here. Loading it
    would write unfolded or float weights into them, silently with ``strict=False``: refused."""
    if prefix + META_NAME + "._extra_state" in state_dict:
        return
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not keys:
        return
    stage = m.stage if (m := get(module)) is not None else "prepared"
    raise fail("QK000", f"this state_dict has no qatkit metadata: it is a float model's "
               f"(e.g. {keys[0]!r}), but the model is {stage}. Its conv weights would land in "
               "slots that hold BN-folded" + (" integer" if stage == "converted" else "") +
               " weights, and BN statistics have no slot at all.",
               "load float weights into the float model, then qk.prepare it again; for a "
               "qatkit checkpoint use qk.load_prepared / qk.load_quantized(float_model, path, "
               "example_inputs)")


def get(model: nn.Module) -> QatkitMeta | None:
    meta = getattr(unwrap(model), META_NAME, None)
    return meta if isinstance(meta, QatkitMeta) else None
