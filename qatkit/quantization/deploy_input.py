"""Deploy-time camera input: put the centered-YUV444 colour converter into a converted model.

The camera/pyramid path of the processor delivers centered YUV444 bytes; a model trained on
RGB gets :class:`~qatkit.fixed_point.yuv_input.QCenteredYUVToRGB` right after its input
QuantStub, with the fixed camera scale 1/128 (the one documented exception to "every quantized
op takes its scale from calibration", rule QK008). See docs/colour.md.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn

from qatkit.base.errors import fail, warn
from qatkit.base.modules import set_submodule
from qatkit.fixed_point.modules import QQuantStub
from qatkit.fixed_point.yuv_input import QCenteredYUVToRGB, YUVCameraInput
from qatkit.quantization import meta

_RANGE_RATIO = 2.0


def insert_yuv_input(converted_model: nn.Module, quant_stub_name: str = "quant", *,
                     mean: Sequence[float] | torch.Tensor | None,
                     std: Sequence[float] | torch.Tensor | None,
                     channel_order: str = "rgb", swing: str = "full") -> nn.Module:
    """A copy of ``converted_model`` that takes centered YUV444 at ``quant_stub_name``.

    The QuantStub there is replaced by :class:`YUVCameraInput`: a QuantStub with the fixed
    camera scale 1/128 and :class:`QCenteredYUVToRGB` producing ``(rgb / 255 - mean) / std``
    (``channel_order`` and per-channel ``mean``/``std`` as in training; ``None`` for none, i.e.
    ``rgb / 255``) at the replaced stub's scale and dtype. The deployed model then takes an int8
    tensor of centered YUV444 bytes (``qatkit.base.colour.rgb_to_yuv444(img)``, NCHW) or those
    bytes / 128 as float. ``mean`` and ``std`` have no default on purpose: a forgotten
    normalisation gives wrong inputs without any error.
    """
    m = meta.get(converted_model)
    if m is None or m.stage != "converted":
        stage = "a float model" if m is None else f"a {m.stage} model"
        raise fail("QK000", f"insert_yuv_input needs a converted (fixed-point) model, got "
                   f"{stage}: the colour converter takes its output scale from the converted "
                   "input QuantStub.", "call qk.convert(...) first")
    try:
        stub = converted_model.get_submodule(quant_stub_name)
    except AttributeError:
        names = [n for n, mod in converted_model.named_modules() if isinstance(mod, QQuantStub)]
        raise fail("QK000", f"the model has no module {quant_stub_name!r}.",
                   f"pass quant_stub_name as one of the input QuantStubs: {names}") from None
    parent = quant_stub_name.rpartition(".")[0]
    inside = isinstance(converted_model.get_submodule(parent), YUVCameraInput)
    if not isinstance(stub, QQuantStub) or inside:
        what = ("already takes centered YUV444" if isinstance(stub, YUVCameraInput) or inside
                else f"is a {type(stub).__name__}, not a converted QuantStub")
        raise fail("QK000", f"module {quant_stub_name!r} {what}.",
                   "name the model's input QuantStub of the converted model, once")
    colour = QCenteredYUVToRGB.from_stub(stub, mean=mean, std=std,
                                         channel_order=channel_order, swing=swing)
    _check_range(colour, quant_stub_name)
    out = copy.deepcopy(converted_model)
    set_submodule(out, quant_stub_name, YUVCameraInput(colour))
    return out


def _check_range(colour: QCenteredYUVToRGB, name: str) -> None:
    """Warn (QK005) when mean/std cannot be what the stub was calibrated on."""
    lo, hi = -colour.mean / colour.std, (1.0 - colour.mean) / colour.std
    implied = float(torch.maximum(lo.abs(), hi.abs()).max())
    calibrated = 127.5 * float(colour.out_scale)
    if colour.out_dtype == "qint16":
        calibrated = 32767.5 * float(colour.out_scale)
    ratio = implied / calibrated
    if 1 / _RANGE_RATIO <= ratio <= _RANGE_RATIO:
        return
    warn("QK005", f"QuantStub {name!r} was calibrated for inputs up to about |x| = "
         f"{calibrated:.3g}, but RGB in [0, 255] normalised with mean={colour.mean.tolist()} "
         f"std={colour.std.tolist()} reaches |x| = {implied:.3g}: these are probably not the "
         "mean/std the model was trained with.",
         "pass the normalisation used in training ((rgb / 255 - mean) / std; mean=None, "
         "std=None for plain rgb / 255)", stacklevel=4)

