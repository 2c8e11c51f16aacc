"""The march and stage recorded in prepared and converted models and in their checkpoints.

``prepare``/``convert`` add a ``qatkit_meta`` submodule whose extra state (march name, stage,
qatkit version) travels in ``state_dict``; loading a checkpoint of another march raises QK002.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from qatkit.errors import fail

META_NAME = "qatkit_meta"


class QatkitMeta(nn.Module):
    def __init__(self, march: str, stage: str) -> None:
        super().__init__()
        self.march, self.stage = march, stage

    def get_extra_state(self) -> dict[str, Any]:
        from qatkit import __version__
        return {"march": self.march, "stage": self.stage, "qatkit": __version__}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        march = state.get("march") if isinstance(state, dict) else None
        if march != self.march:
            raise fail("QK002", f"the checkpoint was made for march {march!r} but this model is "
                       f"prepared for {self.march!r}; scales and dtypes would not match the "
                       "target processor.",
                       f"load it into a model prepared under qk.set_march({march!r}), or "
                       "re-calibrate for the new march")
        self.loaded_stage = state.get("stage")

    def extra_repr(self) -> str:
        return f"march={self.march!r}, stage={self.stage!r}"


def attach(model: nn.Module, march: str, stage: str) -> None:
    setattr(model, META_NAME, QatkitMeta(march, stage))


def get(model: nn.Module) -> QatkitMeta | None:
    m = getattr(model, "module", model) if not hasattr(model, META_NAME) else model
    meta = getattr(m, META_NAME, None)
    return meta if isinstance(meta, QatkitMeta) else None
