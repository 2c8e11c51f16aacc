"""convert: the QAT (or calibrated) model -> the fixed-point model.

Every fake-quantized module becomes its integer form from ``qatkit.fixed_point.modules``; the
scales are exactly the ones the fake quants hold (weights: from the final weights, as in the last
QAT step). The guards of stage "convert" run first: an op whose observer never saw data, saw only
NaN/Inf, or a degenerate range cannot be converted (QK008/QK103); a march change is refused
(QK002).
"""

from __future__ import annotations

import copy

import torch.nn as nn

from qatkit.base import hooks
from qatkit.base.march import get_march, resolve
from qatkit.base.modules import set_submodule
from qatkit.quantization import forwards, meta, validate
from qatkit.quantization.fake_quant import fake_quants
from qatkit.quantization.registry import has_own_output, is_weighted, to_fixed_point


def convert(model: nn.Module, inplace: bool = False, profile: str | None = None) -> nn.Module:
    """Return the fixed-point model (a copy unless ``inplace``). ``profile="onnxruntime"``:
    conv/linear requantize as onnxruntime's fused kernels do, so that the qdq ONNX export is
    identical in onnxruntime (``qatkit/fixed_point/ort_profile.py``; other ops refused)."""
    validate.model(model, "qk.convert")
    validate.stage(model, "qk.convert", ("prepared",))
    if profile is not None:
        from qatkit.fixed_point import ort_profile
        ort_profile.check_name(profile)
    m = meta.get(model)
    if m is None or not fake_quants(model):
        from qatkit.base.errors import fail
        raise fail("QK000", "convert needs a prepared (calibrated or QAT) model.",
                   "call qk.prepare(...), calibrate and/or train, then qk.convert(model)")
    march = get_march() or resolve(m.march)
    hooks.emit("convert", model=model, march=march, recorded_march=m.march)
    if not inplace:
        model = copy.deepcopy(model)
    for _, fq in fake_quants(model):
        fq.finish_calibration()
    # Names, not modules: a list of the modules would keep every QAT module, float32 weights
    # and all, alive until the last layer is converted, beside the new integer weights.
    for name in [n for n, _ in model.named_modules()]:
        try:
            mod = model.get_submodule(name)
        except AttributeError:  # inside a module converted already
            continue
        new = to_fixed_point(mod)  # the registry row's fixed-point form
        del mod
        if new is not None and name:
            if hasattr(new, "qualified_name"):  # named in its errors (QK105)
                new.qualified_name = name
            set_submodule(model, name, new)  # qconfig and silencing travel with it
    for name, mod in model.named_modules():  # left float: never reached at prepare
        if is_weighted(mod) or has_own_output(mod):
            mod._qatkit_unreached = name  # named if quantized values ever reach it (QK008)
    if profile is not None:
        ort_profile.apply(model, profile)
    meta.attach(model, m.march, "converted")
    forwards.announce(model, fixed_point=True)  # keeps the QAT model's lineage number
    model.eval()
    hooks.emit("converted", model=model)  # the doctor: QK008 (ops added later), QK006
    return model
