"""Keeping layers in float: "all but this layer" sensitivity and a float-fallback bisection.

One-layer-at-a-time sensitivity (:mod:`qatkit.analysis.sensitivity`) asks what each layer
does *alone*; errors that only matter together (one layer's error amplified by the next) do
not show there. The opposite view quantizes *every* layer except one:

``all_but_one(model, x, y)`` runs the prepared ``model`` (VALIDATION state) once per layer with
that layer's fake quants passing values through and every other one quantizing. A layer's
**recovery** is ``metric(all but it quantized) - metric(all quantized)``: the accuracy that
would come back if this one op stayed in float. Layers are ranked by recovery (ties by the
SQNR of the model output against the all-float output, higher first).

``bisect`` then keeps layers in float in the order of that ranking, one more each step, until
the metric is within ``tolerance`` of the all-float model: the shortest such prefix names the
layers whose quantization costs the accuracy (with a damaged layer, just that one). These are
diagnoses on the fake-quant model: an op kept in float is not what a march runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from qatkit.analysis.compare import evaluation, stage
from qatkit.analysis.sensitivity import (
    Metric,
    _op_name,
    _outputs,
    output_sqnr,
    passthrough,
    quantizable_layers,
    targets,
)
from qatkit.base.errors import fail


@contextlib.contextmanager
def keep_float(model: nn.Module, layers: Iterable[str]) -> Iterator[nn.Module]:
    """Within the block, the fake quants of ``layers`` (weights and outputs) pass values
    through and every other fake quant of the prepared ``model`` quantizes. Use it together
    with VALIDATION state (``qatkit.analysis.compare.evaluation``)."""
    groups = quantizable_layers(model)
    names = set(layers)
    unknown = names - set(groups)
    if unknown:
        raise fail("QK000", f"no fake-quantized layer named {', '.join(sorted(unknown))}.",
                   f"use one of {', '.join(groups) or '(none: prepare the model first)'}")
    with passthrough([fq for n in names for fq in groups[n]]):
        yield model


@dataclass
class KeptFloat:
    """One layer kept in float, every other one quantized."""

    name: str
    op: str
    metric: float  # the metric with every layer but this one quantized
    recovery: float  # metric - (all layers quantized)
    output_sqnr_db: float  # model output vs the all-float output, capped at 200 dB
    rank: int = 0

    def to_dict(self, scale: float = 1.0) -> dict[str, Any]:
        d = asdict(self)
        d["metric"], d["recovery"] = self.metric * scale, self.recovery * scale
        d["output_sqnr_db"] = round(self.output_sqnr_db, 2)
        return d


@dataclass
class BisectStep:
    float_layers: list[str]
    metric: float

    def to_dict(self, scale: float = 1.0) -> dict[str, Any]:
        return {"step": len(self.float_layers), "float_layers": list(self.float_layers),
                "added": self.float_layers[-1], "metric": self.metric * scale}


@dataclass
class AllButOne:
    """Layers ranked by the metric recovered when each alone stays in float, and the
    bisection's steps (``fallback``: the shortest prefix within ``tolerance``)."""

    metric_name: str
    reference: float  # all layers float
    quantized: float  # all layers quantized (fake quant)
    layers: list[KeptFloat]
    samples: int
    tolerance: float
    steps: list[BisectStep] = field(default_factory=list)
    fallback: list[str] | None = None  # None: not bisected

    def ranking(self) -> list[str]:
        return [r.name for r in self.layers]

    def layer(self, name: str) -> KeptFloat:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self, scale: float = 1.0) -> dict[str, Any]:
        """Metric values times ``scale`` (100: accuracy in percent), unrounded."""
        return {"metric": self.metric_name, "reference": self.reference * scale,
                "quantized": self.quantized * scale, "samples": self.samples,
                "tolerance": self.tolerance * scale,
                "layers": [r.to_dict(scale) for r in self.layers],
                "steps": [s.to_dict(scale) for s in self.steps],
                "fallback": list(self.fallback) if self.fallback is not None else None}


def all_but_one(model: nn.Module, x: Any, y: torch.Tensor | None = None,
                metric: Metric | None = None, *, metric_name: str | None = None,
                layers: Iterable[str] | None = None, batch_size: int = 512,
                tolerance: float = 0.01, bisect: bool = True) -> AllButOne:
    """Rank the layers of the prepared ``model`` by what keeping each one in float recovers
    (see the module docstring); ``bisect``: also find the shortest float fallback within
    ``tolerance`` of the all-float metric. ``x``, ``y``, ``metric`` as for
    :func:`qatkit.analysis.sensitivity.sensitivity`."""
    st = stage(model)
    if st in ("float", "converted"):
        raise fail("QK000", f"all_but_one needs a prepared (calibrated or QAT) model; this one "
                   f"is {'a float' if st == 'float' else 'a converted (fixed-point)'} model.",
                   "pass the calibrated or QAT model that you convert")
    if not tolerance >= 0:
        raise fail("QK000", f"tolerance must be >= 0, got {tolerance}.")
    groups = quantizable_layers(model)
    names = list(groups) if layers is None else list(layers)
    with evaluation(model):
        with keep_float(model, groups):
            ref_out = _outputs(model, x, batch_size)
        target, fn, name = targets(ref_out, y, metric, metric_name)
        reference = float(fn(ref_out, target))
        quantized = float(fn(_outputs(model, x, batch_size), target))
        rows = []
        for n in names:
            with keep_float(model, [n]):
                out = _outputs(model, x, batch_size)
            m = float(fn(out, target))
            rows.append(KeptFloat(n, _op_name(model.get_submodule(n)), m, m - quantized,
                                  output_sqnr(out, ref_out)))
        rows.sort(key=lambda r: (-r.recovery, -r.output_sqnr_db, names.index(r.name)))
        for i, r in enumerate(rows):
            r.rank = i + 1
        result = AllButOne(name, reference, quantized, rows, len(ref_out), tolerance)
        if bisect:
            kept: list[str] = []
            current = quantized
            for r in rows:
                if current >= reference - tolerance:
                    break
                kept.append(r.name)
                with keep_float(model, kept):
                    current = float(fn(_outputs(model, x, batch_size), target))
                result.steps.append(BisectStep(list(kept), current))
            result.fallback = kept
    return result


__all__ = ["AllButOne", "BisectStep", "KeptFloat", "all_but_one", "keep_float"]
