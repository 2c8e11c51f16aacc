"""Per-layer statistics on real data: range, moments, clipping, NaN/Inf, scale and dtype.

``layer_stats(model, batches)`` runs ``model`` over ``batches`` and aggregates, for every layer
(the layers of :mod:`qatkit.analysis.compare`):

* for a prepared (calibrated/QAT) model, the values each layer's output fake quant receives,
  i.e. *before* rounding and clipping, so that ``clipped`` is the share of values beyond the
  quantization bounds and ``range_use`` how much of the int range the data needs
  (``max|x| / (qmax * scale)``: far below 1 means a scale far too large, above 1 clipping);
* for a fixed-point model, the integer outputs: ``clipped`` is the share of values sitting at
  ``qmin``/``qmax`` (saturated);
* for a float model, plain statistics of the outputs (no scale).

Layers without an output fake quant (ReLU, max pooling, int32 accumulators) report their
outputs. Percentiles come from a fixed-size random subsample per layer (seeded).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from qatkit.analysis.compare import Call, Recorder, _num, _sig, as_args, evaluation, leaves, stage
from qatkit.base.errors import fail
from qatkit.base.qtensor import QTensor
from qatkit.base.quant_math import qrange


@dataclass
class LayerStats:
    """Statistics of one layer over all batches (finite values; NaN/Inf counted apart)."""

    name: str
    module: str
    op: str
    index: int
    source: str  # "pre-quant" (fake quant input), "output" (float) or "integer" (fixed point)
    count: int
    min: float
    max: float
    mean: float
    std: float
    absmax: float
    p99_9: float  # 99.9th percentile of |x| (subsample)
    tail_ratio: float | None  # absmax / p99.9: large for rare outliers (long tails)
    nan: int
    inf: int
    scale: float | None
    dtype: str | None
    per_channel: bool
    clipped: float | None  # fraction beyond (pre-quant) or at (fixed point) the bounds
    range_use: float | None  # absmax / (qmax * scale)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("min", "max", "mean", "std", "absmax", "p99_9", "scale"):
            d[k] = _sig(d[k], 5)
        d["tail_ratio"] = _num(d["tail_ratio"], 3)
        d["range_use"] = _num(d["range_use"], 4)
        d["clipped"] = _num(d["clipped"], 6)
        return d


class _Acc:
    """Streaming aggregate of one layer."""

    def __init__(self, c: Call, index: int, max_samples: int) -> None:
        self.name, self.module, self.index = c.label, c.name, index
        self.op = c.method or type(c.module).__name__
        self.max_samples = max_samples
        self.count = self.nan = self.inf = self.clipped = 0
        self.clip_known = False  # pass-through layers hand on already rounded values
        self.sum = self.sumsq = 0.0
        self.min, self.max = math.inf, -math.inf
        self.sample = torch.zeros(0, dtype=torch.float32)
        self.source = "output"
        self.scale: torch.Tensor | None = None
        self.dtype: str | None = None
        self.axis: int | None = None

    def add(self, x: torch.Tensor, gen: torch.Generator) -> None:
        x = x.detach().reshape(-1)
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            self.nan += int(torch.isnan(x).sum())
            self.inf += int(torch.isinf(x).sum())
            x = x[finite]
        if x.numel() == 0:
            return
        xd = x.to(torch.float64)
        self.count += x.numel()
        self.sum += float(xd.sum())
        self.sumsq += float((xd * xd).sum())
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        a = x.abs().to(torch.float32)
        if a.numel() > self.max_samples:
            a = a[torch.randint(a.numel(), (self.max_samples,), generator=gen)]
        self.sample = torch.cat([self.sample, a])
        if self.sample.numel() > self.max_samples:
            keep = torch.randperm(self.sample.numel(), generator=gen)[: self.max_samples]
            self.sample = self.sample[keep]

    def result(self) -> LayerStats:
        n = max(self.count, 1)
        mean = self.sum / n
        var = max(self.sumsq / n - mean * mean, 0.0)
        absmax = max(abs(self.min), abs(self.max)) if self.count else 0.0
        p999 = float(torch.quantile(self.sample, 0.999)) if self.sample.numel() else 0.0
        s = self.scale
        scale = float(s) if s is not None and s.numel() == 1 else None
        range_use = None
        if s is not None and self.dtype is not None:
            qmax = qrange(self.dtype)[1]
            smax = float(s.max()) if s.numel() > 1 else float(s)
            range_use = absmax / (qmax * smax) if smax > 0 else None
        return LayerStats(
            self.name, self.module, self.op, self.index, self.source, self.count,
            self.min if self.count else 0.0, self.max if self.count else 0.0, mean,
            math.sqrt(var), absmax, p999, absmax / p999 if p999 > 0 else None, self.nan,
            self.inf, scale, self.dtype, s is not None and s.numel() > 1,
            self.clipped / self.count if self.count and self.clip_known else None,
            range_use)


@dataclass
class Stats:
    """:class:`LayerStats` of every layer, in call order."""

    stage: str
    layers: list[LayerStats]
    batches: int
    samples: int

    def layer(self, name: str) -> LayerStats:
        for s in self.layers:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "batches": self.batches, "samples": self.samples,
                "layers": [s.to_dict() for s in self.layers]}


def _inputs(batch: Any) -> Any:
    """A batch as the model takes it: tensors/tuples/dicts as they are; ``(x, y)`` pairs of
    labelled data give ``x``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(
            batch[1], torch.Tensor) and batch[1].dtype in (torch.int64, torch.int32):
        return batch[0]
    return batch


def layer_stats(model: nn.Module, batches: Iterable[Any] | torch.Tensor, *,
                max_samples: int = 65536, seed: int = 0) -> Stats:
    """Statistics of every layer of ``model`` over ``batches`` (an iterable of input batches,
    or ``(x, y)`` pairs, or a single input tensor). The model is not changed (it runs in eval
    mode with fake quants in VALIDATION state)."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    st = stage(model)
    gen = torch.Generator().manual_seed(seed)
    accs: dict[str, _Acc] = {}
    n_batches = n_samples = 0

    def on_call(c: Call) -> None:
        acc = accs.get(c.label)
        if acc is None:
            acc = accs[c.label] = _Acc(c, len(accs), max_samples)
        outs = leaves(c.output)
        if c.prequant:  # the value before the output fake quant rounds and clips it
            x = c.prequant[-1]
            acc.source = "pre-quant"
            if c.out_scale is not None:
                acc.scale, acc.dtype, acc.axis = c.out_scale
                qmin, qmax = qrange(acc.dtype)
                r = torch.round(x.detach() / acc.scale)
                acc.clipped += int(((r > qmax) | (r < qmin)).sum())
                acc.clip_known = True
            acc.add(x, gen)
            return
        if not outs:
            return
        y = outs[0]
        if isinstance(y, QTensor):
            acc.source, acc.scale, acc.dtype, acc.axis = "integer", y.scale, y.dtype, y.axis
            if y.dtype != "qint32":
                qmin, qmax = qrange(y.dtype)
                acc.clipped += int(((y.q == qmin) | (y.q == qmax)).sum())
                acc.clip_known = True
            else:  # an int32 accumulator saturates in practice never: no clipping figure
                acc.dtype = None
            acc.add(y.dequantize(), gen)
            return
        if c.out_scale is not None and st != "float":
            acc.scale, acc.dtype, acc.axis = c.out_scale
        if isinstance(y, torch.Tensor) and y.is_floating_point():
            acc.add(y, gen)

    with evaluation(model), Recorder(model, on_call):
        for batch in batches:
            args, kwargs = as_args(_inputs(batch))
            model(*args, **kwargs)
            n_batches += 1
            first = leaves((args, kwargs))
            n_samples += int(first[0].shape[0]) if first and first[0].dim() else 1
    if n_batches == 0:
        raise fail("QK000", "layer_stats got no batches.",
                   "pass a non-empty iterable of input batches (or one tensor)")
    layers = [a.result() for a in sorted(accs.values(), key=lambda a: a.index)]
    from qatkit.analysis.compare import STAGE_LABELS
    return Stats(STAGE_LABELS.get(st, st), layers, n_batches, n_samples)


__all__ = ["LayerStats", "Stats", "layer_stats"]
