"""Value histograms per layer: the float model's outputs and the quantized model's, on shared
bins.

``value_histograms(float_side, quantized, x)`` records every layer's output of both models on
the same batch (``qatkit.analysis.compare.record``) and counts each side's values into the same
``bins`` equal bins spanning both. A quantized side that uses few of its levels (a scale far
too large), piles values at its bounds (clipping) or shifts the distribution shows at a glance.
Pass as the float side the prepared model with every fake quant passing values through
(``qatkit.analysis.sensitivity.float_copy``): same fused weights, so the two differ by
quantization alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from qatkit.analysis.compare import _sig, leaves, record, to_float

BINS = 40


@dataclass
class ValueHistogram:
    name: str
    op: str
    dtype: str | None
    scale: float | None
    edges: list[float]
    float_counts: list[int]
    quant_counts: list[int]
    float_range: tuple[float, float]
    quant_range: tuple[float, float]
    quant_distinct: int  # distinct quantized values seen (levels in use)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "dtype": self.dtype,
                "scale": _sig(self.scale, 6), "edges": [_sig(e, 6) for e in self.edges],
                "float": list(self.float_counts), "quantized": list(self.quant_counts),
                "float_min": _sig(self.float_range[0], 6),
                "float_max": _sig(self.float_range[1], 6),
                "quant_min": _sig(self.quant_range[0], 6),
                "quant_max": _sig(self.quant_range[1], 6),
                "levels_used": self.quant_distinct}


def _first(x: Any) -> Any:
    ts = leaves(x)
    return ts[0] if ts else None


def value_histograms(float_side: nn.Module, quantized: nn.Module, inputs: Any, *,
                     bins: int = BINS, max_layers: int = 48) -> list[ValueHistogram]:
    """Histograms of each layer's output (the first tensor output), float side vs
    quantized side, for the layers both record (at most ``max_layers``, in call order)."""
    calls_f, _ = record(float_side, inputs)
    calls_q, _ = record(quantized, inputs)
    by_label = {c.label: c for c in calls_q}
    out: list[ValueHistogram] = []
    for cf in calls_f:
        cq = by_label.get(cf.label)
        if cq is None or len(out) >= max_layers:
            continue
        yf, yq = _first(cf.output), _first(cq.output)
        if yf is None or yq is None:
            continue
        a = to_float(yf).detach().reshape(-1).to(torch.float64)
        b = to_float(yq).detach().reshape(-1).to(torch.float64)
        if not a.numel() or not b.numel() or not (a.isfinite().all() and b.isfinite().all()):
            continue
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        if hi <= lo:
            hi = lo + 1.0
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        fc = torch.histc(a, bins, lo, hi).to(torch.int64).tolist()
        qc = torch.histc(b, bins, lo, hi).to(torch.int64).tolist()
        scale = getattr(yq, "scale", None)
        dtype = getattr(yq, "dtype", None)
        if cq.out_scale is not None:
            scale, dtype = cq.out_scale[0], cq.out_scale[1]
        s = float(scale) if isinstance(scale, torch.Tensor) and scale.numel() == 1 else None
        out.append(ValueHistogram(
            cf.label, type(cq.module).__name__, dtype if isinstance(dtype, str) else None, s,
            edges.tolist(), fc, qc, (float(a.min()), float(a.max())),
            (float(b.min()), float(b.max())), int(torch.unique(b).numel())))
    return out


__all__ = ["BINS", "ValueHistogram", "value_histograms"]
