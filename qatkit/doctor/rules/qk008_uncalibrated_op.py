"""QK008: an operator without calibration/QAT statistics.

* At convert: an activation fake quant whose observer never saw data, saw only NaN/Inf, or saw
  a degenerate range (all zeros) has no meaningful output scale.
* In a converted model: a module in the deploy region that is not in fixed-point form (e.g. a
  FloatFunctional added after convert: its ``activation_post_process`` is an Identity, so it
  has no scale). Found by data flow when a traced graph is given, else by comparing with the
  module types ``convert`` recorded. The deploy-only colour conversion right after the input
  QuantStub (:class:`~qatkit.fixed_point.yuv_input.QCenteredYUVToRGB`) is the allowed
  exception.
* At run time (``qatkit.doctor.guards.watch_added``): a module added or swapped after prepare
  or after convert (not in the structure recorded then, not in fixed-point form, not a
  value-keeping op) refuses quantized inputs with QK008 naming it; a FloatFunctional in float
  form refuses them too (it was never converted). Float post-processing after the DeQuantStub
  keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import is_fixed_point, owner_name, region
from qatkit.fixed_point.yuv_input import QCenteredYUVToRGB
from qatkit.quantization import meta

_FIX_STATS = ("run calibration (or QAT) batches that exercise every op kept in the deployed "
              "model (all heads and branches), or set qconfig=None on modules that are not "
              "deployed and keep them after the DeQuantStub")
_FIX_ADDED = ("add the op to the float model and go through prepare, calibration/QAT and "
              "convert again so it gets a calibrated output scale (only the deploy-only colour "
              "conversion right after the input QuantStub may be added to a converted model)")


def _statistics(ctx: Context) -> Iterator[Finding]:
    from qatkit.quantization.fake_quant import FakeQuantize
    for name, fq in ctx.model.named_modules():
        if not isinstance(fq, FakeQuantize) or fq.is_weight or fq.fixed:
            continue
        obs = fq.observer
        owner = owner_name(name)
        kind = type(ctx.module(owner)).__name__ if ctx.module(owner) is not None else "op"
        count, bad = int(obs.count), int(obs.nonfinite)
        if count == 0:
            what = ("its output observer never saw data: no calibration or QAT batch ran "
                    "this op (a head or branch the calibration data never took, or a module "
                    "that is never called)")
        elif bad >= count:
            what = f"its output observer saw only NaN/Inf ({bad} values)"
        else:
            amax = torch.maximum(obs.min_val.abs(), obs.max_val.abs())
            if not bool((amax > 0).all()):
                what = ("its output observer saw a degenerate range (every value was exactly "
                        "0), so no scale can be derived")
            else:
                continue
        yield RULE.finding(owner, f"{kind} has no calibration/QAT statistics: {what}. Convert "
                           "would give it an arbitrary output scale, and the deployed model "
                           "would fail or lose accuracy.", fix=_FIX_STATS)


def _colour_ok(ctx: Context, module: nn.Module, producers: list) -> bool:
    if not isinstance(module, QCenteredYUVToRGB):
        return False
    if ctx.graph is None:
        return True
    from qatkit.fixed_point.modules import QQuantStub
    return bool(producers) and all(isinstance(p.module, QQuantStub) for p in producers)


def _not_fixed_point(ctx: Context) -> Iterator[Finding]:
    reported: set[str] = set()
    g = ctx.graph
    if g is not None:
        inside = region(ctx)
        for n in g.nodes:
            if n.kind not in ("module", "functional") or n.index not in inside or \
                    n.target in reported:
                continue
            colour = isinstance(n.module, QCenteredYUVToRGB)
            if (is_fixed_point(n.module) and not colour) or \
                    _colour_ok(ctx, n.module, g.producers(n)):
                continue
            reported.add(n.target)
            yield RULE.finding(n.target, _message(n.module, colour, _qat_form(n.module)),
                               fix=_FIX_ADDED, source=n.source)
    # Without a graph the region is unknown: only modules that exist for the deploy region
    # count (QAT forms; FloatFunctionals added after convert), so float post-processing is
    # spared.
    from qatkit.quantization.stubs import FloatFunctional
    facts = meta.get(ctx.model)
    recorded = facts.structure if facts else {}
    for name, m in ctx.model.named_modules():
        if name in reported or _colour_ok(ctx, m, []):
            continue
        qat = _qat_form(m)
        added = isinstance(m, FloatFunctional) and recorded and recorded.get(name) is not type(m)
        if qat or added:
            yield RULE.finding(name, _message(m, False, qat), fix=_FIX_ADDED)


def _qat_form(m: nn.Module) -> bool:
    """A module that still carries its fake quant: prepare put it in the region, convert
    did not turn it into fixed point (e.g. one instance reachable under two names)."""
    from qatkit.quantization.fake_quant import FakeQuantize
    from qatkit.quantization.qat import QATOp, _QATWeighted
    return isinstance(m, (QATOp, _QATWeighted)) or isinstance(
        getattr(m, "activation_post_process", None), FakeQuantize)


def _message(m: nn.Module, colour: bool, qat: bool) -> str:
    kind = type(m).__name__
    if colour:
        return (f"{kind} is a deploy-only colour conversion but does not come right after the "
                "input QuantStub, the only place where its explicit scale is valid.")
    if qat:
        return (f"{kind} is still in QAT (fake-quant) form inside the converted model: it was "
                "not converted to fixed point (put back from the QAT model, or shared under "
                "two names), so the quantized model cannot run it on integers.")
    return (f"{kind} is in the converted model but not in fixed-point form: it was added (or "
            "replaced) after convert, so it never went through calibration/QAT and has no "
            "output scale. Quantized inference fails or gives wrong values on the BPU.")


def _check(ctx: Context) -> Iterator[Finding]:
    if ctx.stage == "convert":
        yield from _statistics(ctx)
    else:
        yield from _not_fixed_point(ctx)


RULE = Rule(
    code="QK008",
    name="uncalibrated-op",
    severity="error",
    stages=("convert", "converted", "evaluate"),
    summary=(
        "At convert: finds quantized ops whose output observer never saw data (the op was "
        "never run in calibration or QAT), saw only NaN/Inf, or saw a degenerate all-zero "
        "range. In a converted model: finds modules in the deploy region that are not in "
        "fixed-point form, e.g. a FloatFunctional cat added after convert. At run time: any "
        "conv, linear, Softmax, FloatFunctional... added or swapped after calibration/QAT or "
        "convert that receives quantized values (named). The deploy-only "
        "colour conversion placed right after the input QuantStub is the allowed exception."),
    why=(
        "Every quantized op takes its output scale from calibration/QAT statistics at convert "
        "time. Without them the scale is arbitrary: outputs saturate or collapse to zero, or "
        "the compiler rejects the op. An op added to the quantized model has no scale at all; "
        "ops such as cat must see real data to requantize their inputs to one common scale."),
    bad="""
class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant, self.dequant_aux = (qk.QuantStub(), qk.DeQuantStub(),
                                                      qk.DeQuantStub())
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(8 * 6 * 6, 10)
        self.aux = nn.Sequential(nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x, with_aux=False):
        f = self.body(self.quant(x))
        out = self.dequant(self.head(f))
        if with_aux:
            return out, self.dequant_aux(self.aux(f))
        return out


calib = qk.prepare(TwoHeads(), (x, True), qconfig=qk.default_calibration_qconfig())
qk.calibrate(calib, [xb for xb, _ in train_batches[:8]])   # calib(xb): aux never runs
quantized = qk.convert(calib)         # [QK008] module 'aux.0': ... never saw data
""",
    good="""
class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant, self.dequant_aux = (qk.QuantStub(), qk.DeQuantStub(),
                                                      qk.DeQuantStub())
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(8 * 6 * 6, 10)
        self.aux = nn.Sequential(nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x, with_aux=False):
        f = self.body(self.quant(x))
        out = self.dequant(self.head(f))
        if with_aux:
            return out, self.dequant_aux(self.aux(f))
        return out


calib = qk.prepare(TwoHeads(), (x, True), qconfig=qk.default_calibration_qconfig())
qk.set_fake_quantize(calib.eval(), qk.FakeQuantState.CALIBRATION)
with torch.no_grad():
    for xb, _ in train_batches[:8]:
        calib(xb, with_aux=True)      # exercise every head that is deployed
qk.set_fake_quantize(calib, qk.FakeQuantState.VALIDATION)
quantized = qk.convert(calib)
""",
    fix="calibrate (or train in QAT) every op that is deployed, before convert; never add "
        "quantized ops to a converted model except the deploy-only colour conversion",
    check=_check,
)
