"""Deploy-only colour conversion: camera centered YUV444 in, the model's normalised RGB out.

A model trained on ``(rgb / 255 - mean) / std`` has an input QuantStub with a calibrated scale
``s_in``. On the board the camera delivers centered YUV444 int8 (BT.601 full swing, value - 128,
read at the fixed scale 1/128). :func:`insert_yuv_input` replaces that QuantStub of a converted
model with a camera QuantStub (fixed scale 1/128) followed by :class:`QCenteredYUVToRGB`, which
produces, with integers only, the tensor the first layer was calibrated for: normalised RGB (or
BGR) at scale ``s_in`` and the stub's dtype. The arithmetic is ``docs/fixed-point.md`` section
13; it is the one documented op that may be added to a converted model (rule QK008), because
its output scale is not calibrated but given: it is the replaced QuantStub's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from qatkit.base.errors import fail
from qatkit.base.qtensor import QTensor
from qatkit.base.quant_math import quantize
from qatkit.fixed_point import kernels as fp
from qatkit.fixed_point.modules import QModule, QQuantStub

__all__ = ["CAMERA_SCALE", "FRAC_BITS", "QCenteredYUVToRGB", "YUVCameraInput", "colour_matrix"]

CAMERA_SCALE = 1.0 / 128  # exact in float32: the camera path's fixed input scale
FRAC_BITS = 14  # the colour matrix in Q14 (section 13 says why 14)
_ONE = 1 << FRAC_BITS
_RGB_MAX = 255 * _ONE  # 8-bit white in Q14, the clamp of the decoded RGB
_Y_OFFSET = 128  # centered Y = Y - 128; U and V stay centered in the inverse

# BT.601 full-swing inverse, rows R, G, B; columns Y, U, V (the coefficients of qatkit.base.colour).
_INVERSE_FULL = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


def colour_matrix(channel_order: str = "rgb") -> torch.Tensor:
    """The Q14 integer matrix ``W = round_half_even(2**14 * A)`` (int64, [3, 3]): rows are the
    output channels in ``channel_order``, columns Y, U, V."""
    rows = [[round(a * _ONE) for a in row] for row in _INVERSE_FULL]  # round(): half even
    if channel_order == "bgr":
        rows = rows[::-1]
    return torch.tensor(rows, dtype=torch.int64)


def _check_options(swing: str, channel_order: str) -> None:
    if swing == "studio":
        raise fail("QK005", "swing='studio': the NPU's camera/pyramid path delivers BT.601 "
                   "full-swing YUV (Y and UV over all of [0, 255]); decoding it as studio swing "
                   "(Y in [16, 235]) shifts colours by about 8 LSB on average and up to 21.",
                   "use swing='full' (the vendor's helpers default to studio, which is the "
                   "trap)")
    if swing != "full":
        raise fail("QK000", f"unknown swing {swing!r}.",
                   "use swing='full' (what the camera path delivers)")
    if channel_order not in ("rgb", "bgr"):
        raise fail("QK000", f"unknown channel_order {channel_order!r}.",
                   "use 'rgb' or 'bgr': the channel order the model was trained on")


def _per_channel(v: Any, name: str, positive: bool) -> tuple[float, float, float]:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().flatten().tolist()
    if isinstance(v, (int, float)):
        v = (v, v, v)
    try:
        vals = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise fail("QK000", f"{name} must be 3 numbers (one per channel), got {v!r}.",
                   f"pass e.g. {name}=(0.485, 0.456, 0.406)") from None
    if len(vals) != 3 or not all(math.isfinite(x) for x in vals):
        raise fail("QK000", f"{name} must be 3 finite numbers (one per channel), got {v!r}.",
                   f"pass the {name} the model was trained with, in its channel order")
    if positive and not all(x > 0 for x in vals):
        raise fail("QK000", f"{name} must be positive, got {vals}.",
                   "pass the standard deviations used in training")
    return vals  # type: ignore[return-value]


def _camera_float(x: torch.Tensor, who: str) -> torch.Tensor:
    """Camera input as a QuantStub at scale 1/128 reads it: float, centered bytes / 128. Integer
    tensors are the bytes themselves (q / 128 is exact in float32, so quantizing gives q back)."""
    if x.is_floating_point():
        peak = float(x.detach().abs().max()) if x.numel() else 0.0
        if not peak <= 2.0:  # also refuses NaN
            raise fail("QK005", f"{who} received floats up to |x| = {peak:g}; float input is "
                       "centered YUV444 / 128 (in [-1, 1)), read at the fixed scale 1/128.",
                       "divide the centered bytes by 128, or pass them as an int8 tensor")
        return x
    if x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        if x.numel() and (int(x.min()) < -128 or int(x.max()) > 127):
            raise fail("QK005", f"{who}: integer input holds the centered bytes in "
                       f"[-128, 127], got [{int(x.min())}, {int(x.max())}].",
                       "subtract 128 from YUV in [0, 255] (qatkit.base.colour.rgb_to_yuv444 "
                       "with centered=True does)")
        return x.to(torch.float32) / 128
    raise fail("QK000", f"{who} takes an int8 tensor of centered YUV444 bytes or a float "
               f"tensor of bytes / 128, got {x.dtype}.",
               "pass qatkit.base.colour.rgb_to_yuv444(img) (torch, CHW/NCHW)")


def _check_layout(shape: torch.Size, who: str) -> None:
    if len(shape) not in (3, 4) or shape[-3] != 3:
        raise fail("QK000", f"{who} needs Y, U, V channels first (CHW or NCHW), got shape "
                   f"{tuple(shape)}.", "move the channel axis to -3")


def _camera_qtensor(x: Any, who: str) -> QTensor:
    """Centered YUV444 as a QTensor at scale 1/128, qint8, from any of the accepted forms."""
    scale = torch.tensor(CAMERA_SCALE, dtype=torch.float32)
    if isinstance(x, QTensor):
        if x.axis is not None or x.dtype != "qint8" or float(x.scale) != CAMERA_SCALE:
            raise fail("QK005", f"{who} needs centered YUV444 as qint8 at scale 1/128, got "
                       f"{x!r}.", "feed the camera's centered YUV444 bytes (value - 128)")
        q = x.q
    elif isinstance(x, torch.Tensor):
        q = quantize(_camera_float(x, who), scale, "qint8").to(torch.int8)
    else:
        raise fail("QK000", f"{who} takes a QTensor, an int8 tensor of centered YUV444 bytes "
                   f"or a float tensor of bytes / 128, got {type(x).__name__}.",
                   "pass qatkit.base.colour.rgb_to_yuv444(img) (torch, CHW/NCHW)")
    _check_layout(q.shape, who)
    return QTensor(q, scale, "qint8")


class QCenteredYUVToRGB(QModule):
    """Centered YUV444 (qint8, scale 1/128) -> ``(rgb / 255 - mean) / std`` quantized at
    ``out_scale``/``out_dtype``, in integer arithmetic (``docs/fixed-point.md`` section 13).

    ``mean``/``std`` are per channel in ``channel_order`` (the model's input order). Input: a
    QTensor as above, an int8 tensor of centered bytes, or a float tensor of bytes / 128
    (quantized at scale 1/128 exactly as a QuantStub would); CHW or NCHW.
    """


    def __init__(self, out_scale: torch.Tensor | float, out_dtype: str = "qint8", *,
                 mean: Sequence[float] | torch.Tensor | None,
                 std: Sequence[float] | torch.Tensor | None,
                 channel_order: str = "rgb", swing: str = "full") -> None:
        _check_options(swing, channel_order)
        if out_dtype not in ("qint8", "qint16"):
            raise fail("QK000", f"the colour converter outputs qint8 or qint16, got "
                       f"{out_dtype!r}.", "use the dtype of the replaced QuantStub")
        s = torch.as_tensor(out_scale, dtype=torch.float32).detach().cpu()
        if s.numel() != 1 or not (math.isfinite(float(s)) and float(s) > 0):
            raise fail("QK000", f"out_scale must be one positive finite number, got {out_scale}.",
                       "use the scale of the replaced QuantStub")
        super().__init__(s.reshape(()), out_dtype)
        self.channel_order, self.swing = channel_order, swing
        m = (0.0, 0.0, 0.0) if mean is None else _per_channel(mean, "mean", False)
        d = (1.0, 1.0, 1.0) if std is None else _per_channel(std, "std", True)
        self.register_buffer("mean", torch.tensor(m, dtype=torch.float64))
        self.register_buffer("std", torch.tensor(d, dtype=torch.float64))
        self.integer_params()  # refuse impossible constants now, not at the first forward

    @classmethod
    def from_stub(cls, stub: QQuantStub, **kw: Any) -> QCenteredYUVToRGB:
        """The converter that feeds the first layer what ``stub`` fed it."""
        return cls(stub.out_scale, stub.out_dtype, **kw)

    def extra_repr(self) -> str:
        return (f"out_scale={float(self.out_scale):g}, out_dtype={self.out_dtype}, "
                f"channel_order={self.channel_order!r}, mean={self.mean.tolist()}, "
                f"std={self.std.tolist()}")

    def integer_params(self) -> dict[str, torch.Tensor]:
        """W (Q14 matrix), o (mean offsets), m and n (per-channel requant), all int64."""
        c = self._cache.get("params")
        if c is None:
            off = torch.round(self.mean.cpu() * float(_RGB_MAX)).to(torch.int64)
            # 2^-14 / 255 / std_c / s_o, left to right in float64 (section 13)
            M = (2.0**-FRAC_BITS / 255.0 / self.std.cpu()
                 / self.out_scale.cpu().to(torch.float64))
            m, n = fp.multiplier(M)
            # requant is exact in int64 only while |p - o| * |m| * 2^max(-n, 0) < 2^63
            bound = (_RGB_MAX + int(off.abs().max())) * (1 << 15) << max(0, -int(n.min()))
            if bound >= 2**62:
                raise fail("QK000", f"mean={self.mean.tolist()}, std={self.std.tolist()} and "
                           f"out_scale={float(self.out_scale):g} put the colour conversion out "
                           "of int64 range.", "pass the mean/std used in training "
                           "((rgb / 255 - mean) / std) and the stub's scale")
            c = self._cache["params"] = {"W": colour_matrix(self.channel_order), "o": off,
                                         "m": m, "n": n}
        return c

    def forward(self, x: Any) -> QTensor:
        xq = _camera_qtensor(x, type(self).__name__)
        q = xq.q.to(torch.int64)
        ax = q.dim() - 3
        dev = q.device
        p = self.integer_params()
        W, off = p["W"].to(dev), p["o"].to(dev)
        y = q.select(ax, 0) + _Y_OFFSET
        u, v = q.select(ax, 1), q.select(ax, 2)
        # Elementwise int64 (exact; integer matmul is not available on every device).
        rgb = torch.stack([W[c, 0] * y + W[c, 1] * u + W[c, 2] * v for c in range(3)], ax)
        # Clamp to the 8-bit RGB range the model was trained on, as yuv444_to_rgb does.
        acc = rgb.clamp(0, _RGB_MAX) - fp.along(off, ax, q.dim())
        out = fp.requant_mn(acc, p["m"].to(dev), p["n"].to(dev), axis=ax)
        return self._out(out)


class YUVCameraInput(nn.Module):
    """What :func:`insert_yuv_input` puts in place of the input QuantStub: a plain QuantStub
    with the fixed camera scale 1/128 (so the rules see a camera input, QK005) and the
    converter right after it (the one place QK008 allows it). Takes the int8 centered bytes
    as they are, or float bytes / 128 as any QuantStub does."""

    def __init__(self, colour: QCenteredYUVToRGB) -> None:
        super().__init__()
        self.stub = QQuantStub(torch.tensor(CAMERA_SCALE), "qint8")
        self.colour = colour

    def forward(self, x: torch.Tensor) -> QTensor:
        if isinstance(x, torch.Tensor):
            _check_layout(x.shape, "the camera input")
            x = _camera_float(x, "the camera input")
        return self.colour(self.stub(x))


# The calibrated input range (127.5 * s_in) and the range the given mean/std produce from
# RGB in [0, 255] differ by more than this factor: the mean/std are probably not the ones the
# model was trained with (e.g. ImageNet mean/std forgotten: about 2.6 / 1.0).
