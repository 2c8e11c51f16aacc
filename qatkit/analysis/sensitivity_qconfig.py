"""From a sensitivity ranking to a QConfigMapping in one call, with a change log.

``sensitivity_qconfig(result, model_quant, top_k=2)`` (or ``ratio=0.2``, or ``budget=2``) picks
the most sensitive layers of :func:`qatkit.analysis.sensitivity.sensitivity` and moves their
output (``activations=True``) and/or their weights (``weights=True``) from int8 to int16, the
vendor's "sensitive ops to int16" template. Every automatic change is logged, and so is every
fallback: a dtype the march lacks (e.g. int16 weights on ``bayes``) keeps int8, and the log
says why. The selection:

* ``top_k=k``: the ``k`` highest-ranked layers that have an int8 output or int8 weights;
* ``ratio=r``: the same with ``k = ceil(r * number of such layers)``;
* ``budget=k``: at most ``k`` of them, only those that matter on their own (the rule of
  :func:`~qatkit.analysis.sensitivity.suggest_int16`: metric drop >= ``min_drop`` or model
  output SQNR below ``max_output_sqnr_db``).

:func:`apply_sensitivity_qconfig` builds the model with the new mapping from the calibrated/QAT
model (same weights and scales; int16 outputs re-calibrated) and :func:`try_sensitivity_qconfig`
measures its fixed-point model against the original's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from qatkit.analysis.compare import _num, evaluation
from qatkit.analysis.sensitivity import (
    Metric,
    Sensitivity,
    _outputs,
    apply_mapping,
    targets,
)
from qatkit.base.errors import fail
from qatkit.base.march import March, resolve
from qatkit.quantization.fake_quant import FakeQuantize
from qatkit.quantization.qconfig import QConfig, QConfigMapping

WIDE = "qint16"


@dataclass
class DtypeChange:
    """One line of the change log: ``action`` is "changed" (``old`` -> ``new``) or
    "fallback" (``new`` wanted, ``old`` kept: ``reason``)."""

    layer: str
    tensor: str  # "activation" or "weight"
    old: str
    new: str
    action: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SensitivityQConfig:
    """The mapping, the layers chosen (most sensitive first) and the change log."""

    mapping: QConfigMapping
    layers: list[str]
    selection: str
    march: str
    changes: list[DtypeChange] = field(default_factory=list)

    @property
    def changed_layers(self) -> list[str]:
        """The chosen layers that got at least one int16 tensor (most sensitive first)."""
        return [n for n in self.layers
                if any(c.layer == n and c.action == "changed" for c in self.changes)]

    @property
    def budget(self) -> int:
        """How many layers got at least one int16 tensor."""
        return len(self.changed_layers)

    def to_dict(self) -> dict[str, Any]:
        return {"selection": self.selection, "march": self.march, "layers": list(self.layers),
                "changed_layers": self.changed_layers,
                "budget": self.budget, "changes": [c.to_dict() for c in self.changes]}


def _fqs(mod: nn.Module) -> tuple[FakeQuantize | None, FakeQuantize | None]:
    act = getattr(mod, "activation_post_process", None)
    w = getattr(mod, "weight_fake_quant", None)
    return (act if isinstance(act, FakeQuantize) else None,
            w if isinstance(w, FakeQuantize) else None)


def _movable(mod: nn.Module, activations: bool, weights: bool) -> bool:
    act, w = _fqs(mod)
    return (activations and act is not None and act.dtype == "qint8" and not act.fixed) or \
        (weights and w is not None and w.dtype == "qint8")


def sensitivity_qconfig(result: Sensitivity, model_quant: nn.Module, *, top_k: int | None = None,
                        ratio: float | None = None, budget: int | None = None,
                        activations: bool = True, weights: bool = True,
                        march: str | March | None = None, min_drop: float = 0.01,
                        max_output_sqnr_db: float = 30.0) -> SensitivityQConfig:
    """The QConfigMapping that re-creates ``model_quant``'s qconfigs with the chosen sensitive
    layers in int16 (exactly one of ``top_k``, ``ratio``, ``budget``; see the module doc)."""
    given = [k for k, v in (("top_k", top_k), ("ratio", ratio), ("budget", budget))
             if v is not None]
    if len(given) != 1:
        raise fail("QK000", f"give exactly one of top_k, ratio, budget (got {given or 'none'}).",
                   "sensitivity_qconfig(result, model, top_k=2)")
    if not (activations or weights):
        raise fail("QK000", "nothing to move: activations and weights are both False.")
    the_march = resolve(march or result.march or _recorded(model_quant))
    ranked = [r for r in result.layers if _has(model_quant, r.name)
              and _movable(model_quant.get_submodule(r.name), activations, weights)]
    if top_k is not None or ratio is not None:
        if ratio is not None and not 0 <= ratio <= 1:
            raise fail("QK000", f"ratio must be in [0, 1], got {ratio}.")
        k = top_k if top_k is not None else math.ceil(ratio * len(ranked))  # type: ignore
        if k < 0:
            raise fail("QK000", f"top_k must be >= 0, got {k}.")
        chosen = [r.name for r in ranked[:k]]
        selection = f"top_k={top_k}" if top_k is not None else f"ratio={ratio} ({k} layers)"
    else:
        if budget < 0:  # type: ignore[operator]
            raise fail("QK000", f"budget must be >= 0, got {budget}.")
        chosen = [r.name for r in ranked if r.drop >= min_drop
                  or r.output_sqnr_db < max_output_sqnr_db][:budget]
        selection = f"budget={budget}"
    changes: list[DtypeChange] = []
    new_q: dict[str, QConfig] = {}
    for name in chosen:
        mod = model_quant.get_submodule(name)
        q = mod.qconfig
        act, w = _fqs(mod)
        a_spec, w_spec = q.activation, q.weight
        if activations and act is not None and act.dtype == "qint8" and not act.fixed:
            if the_march.supports_dtype(WIDE):
                a_spec = a_spec.with_(dtype=WIDE)
                changes.append(DtypeChange(name, "activation", "qint8", WIDE, "changed",
                                           f"rank {result.layer(name).rank} of "
                                           f"{len(result.layers)} ({selection})"))
            else:
                changes.append(DtypeChange(name, "activation", "qint8", WIDE, "fallback",
                                           f"march {the_march.name} has no int16 activations"))
        if weights and w is not None and w.dtype == "qint8":
            if the_march.supports_weight_dtype(WIDE):
                w_spec = w_spec.with_(dtype=WIDE)
                changes.append(DtypeChange(name, "weight", "qint8", WIDE, "changed",
                                           f"rank {result.layer(name).rank} of "
                                           f"{len(result.layers)} ({selection})"))
            else:
                changes.append(DtypeChange(name, "weight", "qint8", WIDE, "fallback",
                                           f"march {the_march.name} has no int16 weights"))
        new_q[name] = QConfig(a_spec, w_spec, q.high_precision_output)
    mapping = QConfigMapping(None)
    for name, mod in model_quant.named_modules():
        q = getattr(mod, "qconfig", None)
        if isinstance(q, QConfig) and name:
            mapping.set_module_name(name, new_q.get(name, q))
    return SensitivityQConfig(mapping, chosen, selection, the_march.name, changes)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _recorded(model: nn.Module) -> str:
    from qatkit.quantization.meta import get
    m = get(model)
    if m is None:
        raise fail("QK002", "no march is known for this model.", "pass march=...")
    return m.march


def apply_sensitivity_qconfig(model_float: nn.Module, model_quant: nn.Module,
                              plan: SensitivityQConfig, example_inputs: Any,
                              calibration: Iterable[Any]) -> nn.Module:
    """``model_quant`` re-prepared with ``plan.mapping`` (its weights and scales loaded, the
    int16 outputs re-calibrated on ``calibration``), in VALIDATION state."""
    return apply_mapping(model_float, model_quant, plan.mapping, example_inputs, calibration)


def try_sensitivity_qconfig(model_float: nn.Module, model_quant: nn.Module,
                            plan: SensitivityQConfig, example_inputs: Any,
                            calibration: Iterable[Any], x: Any, y: torch.Tensor | None = None,
                            metric: Metric | None = None, batch_size: int = 512
                            ) -> dict[str, Any]:
    """The fixed-point metric before and after the plan, the float metric, and the share of
    the fixed-point model's gap to float that the plan closed."""
    import warnings

    from qatkit.base.errors import QatkitWarning, strict
    from qatkit.quantization.convert import convert
    with evaluation(model_float):
        ref = _outputs(model_float, x, batch_size)
    target, fn, _ = targets(ref, y, metric)
    float_metric = float(fn(ref, target))
    new = apply_sensitivity_qconfig(model_float, model_quant, plan, example_inputs, calibration)
    with strict(False), warnings.catch_warnings():
        warnings.simplefilter("ignore", QatkitWarning)
        before_model, after_model = convert(model_quant), convert(new)
    with torch.no_grad():
        before = float(fn(_outputs(before_model.eval(), x, batch_size), target))
        after = float(fn(_outputs(after_model.eval(), x, batch_size), target))
    gap = float_metric - before
    return {"layers": plan.changed_layers, "selection": plan.selection, "budget": plan.budget,
            "float": float_metric, "before": before, "after": after, "gain": after - before,
            "gap_closed": _num((after - before) / gap, 4) if gap > 0 else None,
            "model": "fixed point", "changes": [c.to_dict() for c in plan.changes]}


__all__ = ["DtypeChange", "SensitivityQConfig", "apply_sensitivity_qconfig",
           "sensitivity_qconfig", "try_sensitivity_qconfig"]
