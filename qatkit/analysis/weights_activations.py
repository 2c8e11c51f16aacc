"""Weight-only vs activation-only quantization: which of the two costs the accuracy.

``weights_vs_activations(model, x, y)`` runs the prepared ``model`` (VALIDATION state) four
times: every fake quant passing values through (float), only the weight fake quants
quantizing, only the activation fake quants (the input QuantStub and every layer output), and
all of them. A large drop with weights only points at the weights (per-channel ranges with an
outlier channel, int8 too coarse for a layer: see the weight-range view); with activations
only, at output scales (a bad calibration, clipping, a layer that needs int16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from qatkit.analysis.compare import cosine, evaluation, stage
from qatkit.analysis.sensitivity import Metric, _outputs, output_sqnr, passthrough, targets
from qatkit.base.errors import fail
from qatkit.quantization.fake_quant import fake_quants

# (key, what is quantized, quantize weights?, quantize activations?)
CONFIGS = (("float", "nothing (float)", False, False),
           ("weights", "weights only", True, False),
           ("activations", "activations only", False, True),
           ("all", "weights and activations", True, True))


@dataclass
class SplitRow:
    key: str
    quantized: str  # what is quantized
    fake_quants: int  # how many fake quants quantize
    metric: float
    drop: float  # all-float metric minus this one
    output_sqnr_db: float  # model output vs the all-float output, capped at 200 dB
    output_cosine: float

    def to_dict(self, scale: float = 1.0) -> dict[str, Any]:
        return {"key": self.key, "quantized": self.quantized, "fake_quants": self.fake_quants,
                "metric": self.metric * scale, "drop": self.drop * scale,
                "output_sqnr_db": round(self.output_sqnr_db, 2),
                "output_cosine": round(self.output_cosine, 6)}


@dataclass
class WeightsActivations:
    metric_name: str
    samples: int
    rows: list[SplitRow]

    def row(self, key: str) -> SplitRow:
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(key)

    def to_dict(self, scale: float = 1.0) -> dict[str, Any]:
        """Metric values times ``scale`` (100: accuracy in percent), unrounded."""
        return {"metric": self.metric_name, "samples": self.samples,
                "rows": [r.to_dict(scale) for r in self.rows]}


def weights_vs_activations(model: nn.Module, x: Any, y: torch.Tensor | None = None,
                           metric: Metric | None = None, *, metric_name: str | None = None,
                           batch_size: int = 512) -> WeightsActivations:
    """The metric of the prepared ``model`` with nothing, only weights, only activations and
    everything quantized (see the module docstring). ``x``, ``y``, ``metric`` as for
    :func:`qatkit.analysis.sensitivity.sensitivity`."""
    st = stage(model)
    if st in ("float", "converted"):
        raise fail("QK000", "weights_vs_activations needs a prepared (calibrated or QAT) "
                   f"model; this one is {'a float' if st == 'float' else 'a converted'} model.",
                   "pass the calibrated or QAT model that you convert")
    fqs = [fq for _, fq in fake_quants(model)]
    rows: list[SplitRow] = []
    with evaluation(model):
        outs: dict[str, torch.Tensor] = {}
        for key, _, weights, acts in CONFIGS:
            off = [fq for fq in fqs if not (weights if fq.is_weight else acts)]
            with passthrough(off):
                outs[key] = _outputs(model, x, batch_size)
    ref = outs["float"]
    target, fn, name = targets(ref, y, metric, metric_name)
    reference = float(fn(ref, target))
    ref_flat = ref.reshape(-1).to(torch.float64)
    for key, what, weights, acts in CONFIGS:
        out = outs[key]
        m = float(fn(out, target))
        rows.append(SplitRow(key, what, sum(1 for fq in fqs if (weights if fq.is_weight
                                                                 else acts)),
                             m, reference - m, output_sqnr(out, ref),
                             cosine(ref_flat, out.reshape(-1).to(torch.float64))))
    return WeightsActivations(name, len(ref), rows)


__all__ = ["CONFIGS", "SplitRow", "WeightsActivations", "weights_vs_activations"]
