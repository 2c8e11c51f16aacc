"""convert: the QAT (or calibrated) model -> the fixed-point model.

Every fake-quantized module becomes its integer form from ``qatkit.quantized``; the scales are
exactly the ones the fake quants hold (weights: from the final weights, as in the last QAT
step). The guards of stage "convert" run first: an op whose observer never saw data, saw only
NaN/Inf, or a degenerate range cannot be converted (QK008/QK103); a march change is refused
(QK002).
"""

from __future__ import annotations

import copy

import torch.nn as nn

from qatkit import guards, meta
from qatkit.fake_quant import FakeQuantize, fake_quants
from qatkit.fuse import set_submodule
from qatkit.march import get_march, resolve
from qatkit.ops import op_kind
from qatkit.qat import QATConv2d, QATConvTranspose2d, QATLinear, QATOp
from qatkit.quantized import (
    QAvgPool2d,
    QClamp,
    QConv2d,
    QConvTranspose2d,
    QDeQuantStub,
    QFunctional,
    QLinear,
    QLookupTable,
    QQuantStub,
    QUpsampleBilinear,
)
from qatkit.stubs import DeQuantStub, FloatFunctional, QuantStub

LUT_KINDS = ("sigmoid", "tanh", "silu", "hardswish", "hardsigmoid")


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the fixed-point model (a copy unless ``inplace``)."""
    m = meta.get(model)
    if m is None or not fake_quants(model):
        from qatkit.errors import fail
        raise fail("QK000", "convert needs a prepared (calibrated or QAT) model.",
                   "call qk.prepare(...), calibrate and/or train, then qk.convert(model)")
    march = get_march() or resolve(m.march)
    guards.check(guards.context(model, "convert", march, extra={"recorded_march": m.march}))
    if not inplace:
        model = copy.deepcopy(model)
    for _, fq in fake_quants(model):
        if fq._dirty:
            fq.update_scale()
    for name, mod in list(model.named_modules()):
        new = _convert_module(mod)
        if new is not None:
            for keep in ("_qatkit_silenced",):
                if hasattr(mod, keep):
                    setattr(new, keep, getattr(mod, keep))
            if name:
                set_submodule(model, name, new)
    meta.attach(model, m.march, "converted")
    model.eval()
    guards.attach_converted(model)  # QK008 (ops added later), QK006 (fixed-point evaluated)
    return model


def _convert_module(mod: nn.Module) -> nn.Module | None:
    if isinstance(mod, QuantStub) and isinstance(mod.activation_post_process, FakeQuantize):
        fq = mod.activation_post_process
        return QQuantStub(fq.scale, fq.dtype)
    if isinstance(mod, DeQuantStub):
        return QDeQuantStub()
    if isinstance(mod, QATConv2d):
        return QConv2d(mod)
    if isinstance(mod, QATLinear):
        return QLinear(mod)
    if isinstance(mod, QATConvTranspose2d):
        return QConvTranspose2d(mod)
    if isinstance(mod, FloatFunctional) and isinstance(mod.activation_post_process,
                                                       FakeQuantize):
        fq = mod.activation_post_process
        return QFunctional(fq.scale, fq.dtype, mod.fused_activation)
    if isinstance(mod, QATOp):
        fq, op = mod.activation_post_process, mod.op
        kind = op_kind(op)
        if kind in LUT_KINDS:
            return QLookupTable(kind, fq.scale, fq.dtype)
        if kind in ("relu6", "hardtanh"):
            return QClamp(op.min_val, op.max_val, fq.scale, fq.dtype)
        if kind == "avg_pool2d":
            if op.ceil_mode or not op.count_include_pad or op.divisor_override:
                from qatkit.errors import fail
                raise fail("QK106", "AvgPool2d in fixed point supports ceil_mode=False, "
                           "count_include_pad=True and no divisor_override.")
            return QAvgPool2d(op.kernel_size, op.stride, op.padding, fq.scale, fq.dtype)
        if kind == "adaptive_avg_pool2d":
            return QAvgPool2d(None, None, 0, fq.scale, fq.dtype, adaptive_out=op.output_size)
        if kind == "upsample_bilinear":
            return QUpsampleBilinear(op.size, op.scale_factor, bool(op.align_corners), fq.scale,
                                     fq.dtype, op.recompute_scale_factor)
    return None
