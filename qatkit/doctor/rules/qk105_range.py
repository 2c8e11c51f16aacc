"""QK105: weight and activation ranges that int8 represents badly.

Weights (per output channel, as quantized): the scale is ``max|w| / 127.5``. When one outlier
makes ``max|w|`` more than ``WEIGHT_OUTLIER_RATIO`` (8) times the 99th percentile of ``|w|``, 99%
of the weights use at most 16 of the 128 levels of each sign: 3 of 8 bits are spent on the
outlier. Trained conv weights are close to Gaussian or Laplacian, where the ratio is below 2
for a few hundred weights (and never above ~3), so 8 flags real outliers only. Channels with
fewer than ``MIN_WEIGHTS`` weights are skipped (their 99th percentile is their maximum).

Activations (histogram observers: the calibration defaults MSE and percentile):

* clipping: more than ``CLIP_FRACTION`` (1%) of the values observed lie beyond the calibrated
  threshold. MSE on well-behaved data clips around 0.01%; 1% means the threshold cuts into the
  distribution and saturation errors dominate;
* resolution: the median non-zero magnitude is below ``TYPICAL_LEVELS`` (2) quantization steps:
  typical values round to 0, 1 or 2 levels (over 25% relative error, nearly ternary values),
  because a few huge values stretched the range. Post-ReLU activations of trained CNNs with
  MSE thresholds sit around 5-20 steps; 4 already fires on heavy-tailed but healthy layers.

Activations (any observer: the min/max every observer keeps, which checkpoints carry, so a QAT
model's moving-average observers and a reloaded calibration are checked too):

* scale far too large: the largest ``|x|`` observed needs under ``RANGE_USE`` (1/8) of the int
  range at the scale in use (over 3 bits wasted). A scale made from its own observer uses at
  least half of it (all of it for min/max; MSE and percentile thresholds lie below the maximum;
  a power-of-two scale rounds up at most 2x), so this fires only on a scale that did not come
  from the data: set, scaled or loaded by hand, or from another model. Clipping needs the
  distribution, so only histogram observers are checked for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn

from qatkit.base.quant_math import qrange
from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import effective_scale, fmt, owner_name, region
from qatkit.quantization.fake_quant import FakeQuantize, fake_quants
from qatkit.quantization.observers import HistogramObserver, Observer
from qatkit.quantization.registry import op_kind

WEIGHT_OUTLIER_RATIO = 8.0
MIN_WEIGHTS = 64
PERCENTILE = 0.99
CLIP_FRACTION = 0.01
TYPICAL_LEVELS = 2.0
RANGE_USE = 1 / 8  # the largest observed |x| below qmax/8 steps: over 3 bits wasted


def _weight_oc_first(mod: nn.Module) -> torch.Tensor | None:
    """Weights with the output channel on axis 0, as they are quantized (float or int)."""
    kind = op_kind(mod)
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    if kind == "conv_transpose2d":  # stored [Cin, Cout/g, kh, kw]
        g = mod.groups
        return w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:]).transpose(1, 2).reshape(
            g * w.shape[1], w.shape[0] // g, *w.shape[2:])
    if kind in ("conv2d", "linear"):
        return w
    from qatkit.fixed_point.modules import QConv2d, QConvTranspose2d, QLinear
    if isinstance(mod, (QConv2d, QLinear, QConvTranspose2d)):
        return w  # stored output channel first
    return None


def _quantized_weights(mod: nn.Module) -> bool:
    """Without a trace, only modules already in QAT or fixed-point form are known to be
    quantized."""
    from qatkit.fixed_point.modules import QConv2d, QConvTranspose2d, QLinear
    return hasattr(mod, "weight_fake_quant") or isinstance(mod, (QConv2d, QLinear,
                                                                 QConvTranspose2d))


def _outlier_channels(w: torch.Tensor) -> torch.Tensor | None:
    """max|w| / 99th percentile of |w| per output channel (0 where the percentile is 0, and
    where the ratio is at most the limit: only flagged channels get an exact percentile)."""
    a = w.detach().flatten(1).abs().to(torch.float32)
    n = a.shape[1]
    if n < MIN_WEIGHTS:
        return None
    k = max(1, math.ceil(PERCENTILE * n))
    mx = a.amax(1)
    # p99 < max / limit  <=>  fewer than n - k + 1 weights reach max / limit: one cheap pass
    # instead of a selection per channel.
    above = (a >= (mx / WEIGHT_OUTLIER_RATIO)[:, None]).sum(1)
    ratio = torch.zeros_like(mx)
    cand = (above <= n - k).nonzero().flatten()
    if len(cand):
        p = torch.kthvalue(a[cand], k, dim=1).values
        ratio[cand] = torch.where(p > 0, mx[cand] / p.clamp_min(1e-30), torch.zeros_like(p))
    return ratio


def _weight_findings(ctx: Context) -> Iterator[Finding]:
    names: set[str] | None = None
    if ctx.graph is not None:
        reg = region(ctx)
        names = {n.target for n in ctx.graph.nodes if n.index in reg and n.kind == "module"}
    qconfigs = ctx.qconfigs if ctx.stage in ("float", "prepare") else None
    with torch.no_grad():
        for name, mod in ctx.model.named_modules():
            if names is not None and name not in names:
                continue
            if names is None and not _quantized_weights(mod):
                continue
            if qconfigs is not None and qconfigs.get(name) is None:
                continue
            if getattr(getattr(mod, "weight_fake_quant", None), "dtype", "qint8") == "qint16":
                continue  # 32768 levels per sign: an outlier costs little resolution
            w = _weight_oc_first(mod)
            if w is None:
                continue
            res = _outlier_channels(w)
            if res is None:
                continue
            ratio = res
            bad = (ratio > WEIGHT_OUTLIER_RATIO).nonzero().flatten()
            if not len(bad):
                continue
            worst = int(bad[ratio[bad].argmax()])
            r = float(ratio[worst])
            yield RULE.finding(
                name,
                f"{len(bad)} of {w.shape[0]} output channels of '{name}' have a weight outlier: "
                f"in channel {worst} max|w| is {r:.1f}x the 99th percentile of |w| (limit "
                f"{WEIGHT_OUTLIER_RATIO:.0f}x), so 99% of its weights use at most "
                f"{127.5 / r:.2g} of the 128 int8 levels per sign.",
                fix="retrain with weight decay or clip the outliers (e.g. to 4x the 99th "
                    "percentile) and fine-tune; check the folded BN of the channel (a tiny "
                    "running_var inflates the folded weights)")


def _wasted_range(name: str, fq: FakeQuantize, s: float) -> Finding | None:
    """The scale in use is far wider than the observed min/max need (any observer)."""
    peak = float(Observer.amax(fq.observer))
    qmax = qrange(fq.dtype)[1]
    if not (peak > 0 and math.isfinite(peak)) or peak >= RANGE_USE * qmax * s:
        return None
    owner = owner_name(name)
    need = peak / qmax
    return RULE.finding(
        owner,
        f"the output scale of '{owner}' ({fmt(s)}) is {s / need:.0f}x what its observed range "
        f"needs ({fmt(need)} for the largest |x| seen, {fmt(peak)}): the data spans "
        f"{peak / s:.1f} of {qmax} {fq.dtype} levels (limit {RANGE_USE * qmax:.0f}), so its "
        "values are rounded to a handful of steps.",
        fix="re-calibrate this op's output scale on representative data and check that no "
            "scale was set, scaled or loaded by hand (or from another model)")


def _activation_findings(ctx: Context) -> Iterator[Finding]:
    for name, fq in fake_quants(ctx.model):
        obs = fq.observer
        if fq.is_weight or fq.fixed or not obs.seen:
            continue
        s = effective_scale(fq, ctx)
        if s is None or s.numel() != 1:
            continue
        wasted = _wasted_range(name, fq, float(s))
        if wasted is not None:
            yield wasted
            continue
        # the histogram is not in checkpoints: a reloaded observer has none
        total = int(obs.hist.sum()) if isinstance(obs, HistogramObserver) else 0
        if total == 0:
            continue
        owner = owner_name(name)
        w = obs.bin_width()
        qmin, qmax = qrange(fq.dtype)
        amax = float(s) * (qmax - qmin) / 2  # the threshold the scale was made from
        hist = obs.hist.to(torch.float64)
        first_clipped = min(math.ceil(amax / w - 1e-9), hist.numel())  # bins above threshold
        clipped = float(hist[first_clipped:].sum()) / total
        peak = float(Observer.amax(obs))
        if clipped > CLIP_FRACTION:
            yield RULE.finding(
                owner,
                f"the calibrated threshold of '{owner}' ({fmt(amax)}) clips {100 * clipped:.1f}% "
                f"of the observed values (limit {100 * CLIP_FRACTION:.0f}%; largest |x| seen "
                f"{fmt(peak)}): those saturate in the fixed-point model.",
                fix="use a percentile observer with a higher percentile or minmax for this "
                    "op, or qint16 where the march allows it; check the float model for "
                    "activation outliers")
            continue
        nonzero = hist[1:]
        nz = float(nonzero.sum())
        if nz <= 0:
            continue
        j = int(torch.searchsorted(torch.cumsum(nonzero, 0),
                                   torch.tensor([nz / 2], dtype=torch.float64))[0])
        median = (j + 1.5) * w  # center of the median bin (bin 0 excluded)
        levels = median / float(s)
        if levels < TYPICAL_LEVELS:
            yield RULE.finding(
                owner,
                f"the range of '{owner}' is so wide that typical values use few levels: the "
                f"median non-zero |x| is {fmt(median)}, {levels:.1f} quantization steps of "
                f"{fmt(float(s))} (limit {TYPICAL_LEVELS:.0f}); the range is set by values "
                f"up to {fmt(peak)}.",
                fix="find what produces the rare large values (a missing BN or activation, "
                    "an unnormalized input); use qint16 for this op where the march allows it")


def _check(ctx: Context) -> Iterator[Finding]:
    yield from _weight_findings(ctx)
    if ctx.stage != "float":
        yield from _activation_findings(ctx)


RULE = Rule(
    code="QK105",
    name="range int8 cannot hold well",
    severity="warning",
    stages=("float", "convert", "converted"),
    summary=f"Weights: output channels whose max|w| exceeds {WEIGHT_OUTLIER_RATIO:.0f}x their "
            f"99th percentile of |w|. Activations with histogram statistics (MSE, percentile "
            f"observers): calibrated thresholds that clip more than {100 * CLIP_FRACTION:.0f}% "
            f"of the data, or ranges so wide that the median non-zero value is under "
            f"{TYPICAL_LEVELS:.0f} quantization steps. Activations with any observer (a QAT "
            f"model's too): scales so large that the largest value observed needs under "
            "1/8 of the int range (a scale set, scaled or loaded by hand). Runs in "
            "the doctor and at convert.",
    why="int8 has 256 levels spread uniformly over the range. A weight outlier or a rare "
        "huge activation stretches the range so that the bulk of the values fall on a few "
        "levels; a scale larger than the data needs (edited, or loaded from another model) "
        "does the same to every value; a threshold that clips too much saturates real values. "
        "Each loses accuracy that QAT can only partly recover.",
    bad="""
model = Net()
with torch.no_grad():                        # e.g. after a bad fine-tuning step
    model.fc.weight[3, 17] = 25.0            # every other weight is below 0.07
report = qk.doctor.check(model, x)  # [QK105] 1 of 10 output channels of 'fc' have a weight outlier
""",
    good="""
model = Net()
with torch.no_grad():                        # e.g. after a bad fine-tuning step
    model.fc.weight[3, 17] = 25.0
    w = model.fc.weight                      # clip outliers to 4x the 99th percentile
    t = 4 * w.abs().quantile(0.99, dim=1, keepdim=True)
    w.copy_(torch.maximum(torch.minimum(w, t), -t))   # (then fine-tune)
report = qk.doctor.check(model, x)
""",
    fix="remove weight outliers (weight decay, clipping and fine-tuning), choose observers "
        "that fit the data, re-calibrate scales that did not come from the data, or use qint16 "
        "for the affected ops",
    check=_check,
)
