"""Per-channel weight ranges of every GEMM layer (conv, linear, transposed conv).

For each output channel ``c`` of a layer: ``min_c``, ``max_c`` of its weights and the
quantization scale ``s_c`` its weights get (``max_c |w| / qmax``, as convert computes it;
a channel whose weights are all zero takes its range from its bias). Per-channel scales give
each channel all its levels; what the ranges still show is

* ``spread = max_c absmax_c / median_c absmax_c``: one channel far wider than the rest (an
  outlier that a per-tensor scale would spend the levels on);
* ``zero_channels``: channels whose weights are all zero (dead filters).

A prepared model gives the float (possibly QAT-trained, BN-folded) weights; a converted model
the dequantized integer weights ``q_c * s_c``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from qatkit.analysis.compare import _sig


@dataclass
class ChannelRanges:
    name: str
    op: str
    dtype: str
    weights: str  # "float" (prepared) or "dequantized" (converted)
    ch_min: list[float]
    ch_max: list[float]
    ch_scale: list[float]

    @property
    def channels(self) -> int:
        return len(self.ch_min)

    def to_dict(self) -> dict[str, Any]:
        absmax = [max(abs(lo), abs(hi)) for lo, hi in zip(self.ch_min, self.ch_max)]
        ordered = sorted(absmax)
        median = ordered[(len(ordered) - 1) // 2] if ordered else 0.0
        widest = max(range(len(absmax)), key=absmax.__getitem__) if absmax else None
        return {"name": self.name, "op": self.op, "dtype": self.dtype,
                "weights": self.weights, "channels": self.channels,
                "min": _sig(min(self.ch_min, default=0.0), 6),
                "max": _sig(max(self.ch_max, default=0.0), 6),
                "absmax_median": _sig(median, 6),
                "spread": _sig(max(absmax) / median, 4) if absmax and median > 0 else None,
                "widest_channel": widest,
                "zero_channels": sum(1 for a in absmax if a == 0.0),
                "scale_min": _sig(min(self.ch_scale, default=0.0), 6),
                "scale_max": _sig(max(self.ch_scale, default=0.0), 6),
                "ch_min": [_sig(v, 6) for v in self.ch_min],
                "ch_max": [_sig(v, 6) for v in self.ch_max],
                "ch_scale": [_sig(v, 6) for v in self.ch_scale]}


def oc_first(mod: nn.Module) -> torch.Tensor:
    """The weight of ``mod`` with output channels first (a transposed conv stores
    ``[Cin, Cout/groups, kh, kw]``)."""
    w = mod.weight.detach()
    if isinstance(mod, nn.ConvTranspose2d):
        g = mod.groups
        cin, cog = w.shape[0], w.shape[1]
        return w.reshape(g, cin // g, cog, *w.shape[2:]).transpose(1, 2).reshape(
            g * cog, cin // g, *w.shape[2:])
    return w


def gemm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The QAT (prepared) or fixed-point (converted) conv/linear modules, in module order."""
    from qatkit.fixed_point.modules import _QWeighted
    from qatkit.quantization.qat import _QATWeighted
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (_QATWeighted,
                                                                       _QWeighted))]


def _op(mod: nn.Module) -> str:
    name = type(mod).__name__
    for prefix in ("QAT", "Q"):
        if name.startswith(prefix) and name[len(prefix):len(prefix) + 1].isupper():
            return name[len(prefix):]
    return name


def weight_ranges(model: nn.Module) -> list[ChannelRanges]:
    """:class:`ChannelRanges` of every GEMM layer of a prepared or converted ``model`` (none
    for a float model)."""
    from qatkit.quantization.qat import _QATWeighted
    out = []
    for name, mod in gemm_layers(model):
        if isinstance(mod, _QATWeighted):
            w = oc_first(mod)
            fq = mod.weight_fake_quant
            s = fq.weight_scale(w, mod.bias).detach().reshape(-1).to(torch.float64)
            dtype, kind = fq.dtype, "float"
        else:  # fixed point: int weights (output channels first) and their scales
            s = mod.weight_scale.detach().reshape(-1).to(torch.float64)
            w = mod.weight.to(torch.float64) * s.reshape(-1, *([1] * (mod.weight.dim() - 1)))
            dtype = str(mod.weight.dtype).removeprefix("torch.").replace("int", "qint")
            kind = "dequantized"
        flat = w.reshape(w.shape[0], -1).to(torch.float64)
        if s.numel() == 1:
            s = s.expand(flat.shape[0])
        out.append(ChannelRanges(name, _op(mod), dtype, kind, flat.amin(1).tolist(),
                                 flat.amax(1).tolist(), s.tolist()))
    return out


__all__ = ["ChannelRanges", "gemm_layers", "oc_first", "weight_ranges"]
