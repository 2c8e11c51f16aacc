"""RGB/BGR <-> centered YUV444 conversion, bit-exact with the NPU's camera path.

The camera/pyramid path of a BPU-style NPU delivers *centered YUV444*: BT.601 **full swing**
YUV in [0, 255] minus 128, i.e. every channel in [-128, 127]. A network deployed on camera
input must be trained on exactly that, so these helpers reproduce the hardware's integer form.

Forward, integer form (R, G, B in [0, 255]; ``>>`` is an arithmetic shift, i.e. floor division)::

    full swing   (the hardware's):
        Y = (  77 R + 150 G +  29 B + 128) >> 8
        U = ( -43 R -  84 G + 127 B + 128) >> 8 + 128
        V = ( 127 R - 106 G -  21 B + 128) >> 8 + 128
    studio swing (BT.601 "TV range"; vendor helpers default to it -- a trap):
        Y = (  66 R + 129 G +  25 B + 128) >> 8 + 16
        U = ( -38 R -  74 G + 112 B + 128) >> 8 + 128
        V = ( 112 R -  94 G -  18 B + 128) >> 8 + 128
    then clamp each channel to [0, 255]; centered output = value - 128, in [-128, 127].

Rounding: the ``+ 128`` before ``>> 8`` rounds the /256 to nearest, ties up. Pillow's
``Image.convert("YCbCr")`` (an independent BT.601 full-range reference) truncates instead, so
the two agree within 1 LSB on photos (2 LSB on a few saturated colours; measured over all
2**24 RGB triples). Round-to-nearest is the closer of the two to the exact BT.601 values.

Inverse (float, then round half up and clamp to [0, 255]; U, V below are *centered* chroma,
i.e. U - 128 and V - 128)::

    full swing:   R = Y + 1.402 V
                  G = Y - 0.344136 U - 0.714136 V
                  B = Y + 1.772 U
    studio swing: Y' = (255 / 219) (Y - 16), k = 255 / 224
                  R = Y' + k 1.402 V
                  G = Y' - k 0.344136 U - k 0.714136 V
                  B = Y' + k 1.772 U

Full-swing rgb -> yuv -> rgb is exact within 3 LSB on every one of the 2**24 RGB triples
(about 1 LSB on most pixels): two 8-bit quantisations plus the 8-bit forward coefficients.

Accepted inputs (conversion functions):

* numpy arrays, channels last: HWC or NHWC. Integer dtypes (values in range) use the exact
  integer form and return ``uint8`` (not centered) or ``int8`` (centered).
* torch tensors, channels first: CHW or NCHW. Integer dtypes behave like numpy integers
  (``uint8``/``int8`` tensors out); float tensors return ``float32`` tensors holding integer
  values, computed without autograd, so the functions can sit in a DataLoader transform.
* float numpy arrays are treated like float tensors and return ``float32`` arrays.

Float inputs go through the same integer-form formula evaluated elementwise in float32 (exact
for integer-valued inputs, since every partial sum stays below 2**24), so float and integer
paths agree bit for bit on integer-valued pixels, on CPU and GPU alike.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "bgr_to_yuv444",
    "looks_centered",
    "rgb_to_yuv444",
    "yuv444_to_bgr",
    "yuv444_to_rgb",
]

Swing = Literal["full", "studio"]
ChannelOrder = Literal["rgb", "bgr"]
Array = Any  # np.ndarray | torch.Tensor

# Rows: Y, U, V; columns: R, G, B. Integer coefficients over 256, and per-row offsets.
_FORWARD: dict[str, tuple[tuple[tuple[int, int, int], ...], tuple[int, int, int]]] = {
    "full": (((77, 150, 29), (-43, -84, 127), (127, -106, -21)), (0, 128, 128)),
    "studio": (((66, 129, 25), (-38, -74, 112), (112, -94, -18)), (16, 128, 128)),
}

# Inverse: (luma gain, luma offset, R<-V, G<-U, G<-V, B<-U), chroma taken centered.
_KC = 255.0 / 224.0
_INVERSE: dict[str, tuple[float, float, float, float, float, float]] = {
    "full": (1.0, 0.0, 1.402, 0.344136, 0.714136, 1.772),
    "studio": (255.0 / 219.0, 16.0, _KC * 1.402, _KC * 0.344136, _KC * 0.714136, _KC * 1.772),
}

# Float inputs may stray this far outside their range (float rounding) before we refuse them.
_FLOAT_TOLERANCE = 0.5


# --------------------------------------------------------------------------- validation


def _check_options(swing: str, channel_order: str) -> None:
    if swing not in _FORWARD:
        raise ValueError(
            f"unknown swing {swing!r}: pass swing='full' (BT.601 full range, what the NPU's "
            "camera path uses) or swing='studio' (BT.601 16..235 TV range)"
        )
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(
            f"unknown channel_order {channel_order!r}: pass channel_order='rgb' or 'bgr'"
        )


def _channel_axis(x: Array, what: str) -> int:
    """Validate the layout and return the (negative) channel axis: -3 for torch, -1 for numpy."""
    if isinstance(x, torch.Tensor):
        if x.dim() not in (3, 4) or x.shape[-3] != 3:
            hint = ""
            if x.dim() in (3, 4) and x.shape[-1] == 3:
                hint = " (looks channels-last: use x.permute(2, 0, 1) or x.permute(0, 3, 1, 2))"
            raise ValueError(
                f"{what}: torch tensors must be channels-first CHW or NCHW with 3 channels, "
                f"got shape {tuple(x.shape)}{hint}"
            )
        return -3
    if isinstance(x, np.ndarray):
        if x.ndim not in (3, 4) or x.shape[-1] != 3:
            hint = ""
            if x.ndim in (3, 4) and x.shape[-3] == 3:
                hint = " (looks channels-first: use np.moveaxis(x, -3, -1), or pass a torch tensor)"
            raise ValueError(
                f"{what}: numpy arrays must be channels-last HWC or NHWC with 3 channels, "
                f"got shape {x.shape}{hint}"
            )
        return -1
    raise ValueError(
        f"{what}: expected a numpy array (HWC/NHWC) or a torch tensor (CHW/NCHW), "
        f"got {type(x).__name__}"
    )


def _is_float(x: Array) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point()
    return np.issubdtype(x.dtype, np.floating)


def _is_int(x: Array) -> bool:
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return np.issubdtype(x.dtype, np.integer)


def _minmax(x: Array) -> tuple[float, float]:
    return float(x.min()), float(x.max())  # NaN propagates (numpy and torch alike)


def _check_values(x: Array, lo: int, hi: int, what: str, expected: str) -> None:
    """Refuse wrong dtypes and values outside [lo, hi] (floats: within _FLOAT_TOLERANCE)."""
    if not (_is_int(x) or _is_float(x)):
        raise ValueError(
            f"{what}: unsupported dtype {x.dtype}; pass uint8/int8 (or another integer dtype) "
            f"or a float dtype with values in {expected}"
        )
    if (x.numel() if isinstance(x, torch.Tensor) else x.size) == 0:
        return
    mn, mx = _minmax(x)
    tol = _FLOAT_TOLERANCE if _is_float(x) else 0.0
    # Written so that NaN (all comparisons False) is refused as well.
    if not (mn >= lo - tol and mx <= hi + tol):
        hint = ""
        if _is_float(x) and mn < 0 and mx < 8:
            hint = "; the values look normalized ((x - mean) / std): pass raw pixel values"
        elif _is_float(x) and lo == 0:
            hint = "; clamp first (e.g. after bicubic resizing)"
        raise ValueError(f"{what}: values must lie in {expected}, got [{mn:g}, {mx:g}]{hint}")
    if _is_float(x) and lo == 0 and mn >= 0 and mx <= 1:
        frac = x - x.floor() if isinstance(x, torch.Tensor) else x - np.floor(x)
        if bool((frac != 0).any()):
            raise ValueError(
                f"{what}: float values look scaled to [0, 1] (got [{mn:g}, {mx:g}] with "
                "fractional values); these helpers expect pixel values in [0, 255]: "
                "multiply by 255 first"
            )


# --------------------------------------------------------------------------- array helpers


def _split(x: Array, axis: int) -> tuple[Array, Array, Array]:
    if isinstance(x, torch.Tensor):
        return x.select(axis, 0), x.select(axis, 1), x.select(axis, 2)
    return x[..., 0], x[..., 1], x[..., 2]


def _stack(chans: list[Array], axis: int) -> Array:
    if isinstance(chans[0], torch.Tensor):
        return torch.stack(chans, dim=axis)
    return np.stack(chans, axis=axis)


def _f32(x: Array, v: float) -> Array:
    """A float32 scalar on the same backend/device as x (keeps arithmetic in float32)."""
    if isinstance(x, torch.Tensor):
        return torch.tensor(v, dtype=torch.float32, device=x.device)
    return np.float32(v)


def _floor(x: Array) -> Array:
    return torch.floor(x) if isinstance(x, torch.Tensor) else np.floor(x)


def _clip(x: Array, lo: float, hi: float) -> Array:
    return torch.clamp(x, lo, hi) if isinstance(x, torch.Tensor) else np.clip(x, lo, hi)


def _round_div256(s: Array) -> Array:
    """s / 256 rounded to nearest, ties up: (s + 128) >> 8, the same on float and int input."""
    if _is_float(s):
        return _floor((s + 128) * _f32(s, 1.0 / 256.0))  # /256 is exact in float32
    return (s + 128) >> 8  # arithmetic shift: floor division, also for negative s


def _as(x: Array, kind: str) -> Array:
    """Cast to int32 / float32 / uint8 / int8 on x's backend."""
    if isinstance(x, torch.Tensor):
        return x.to(getattr(torch, kind))
    return x.astype(getattr(np, kind))


# --------------------------------------------------------------------------- conversions


def rgb_to_yuv444(
    x: Array,
    *,
    swing: Swing = "full",
    centered: bool = True,
    channel_order: ChannelOrder = "rgb",
) -> Array:
    """Convert RGB (or BGR with ``channel_order="bgr"``) pixels in [0, 255] to YUV444.

    Output channels are ordered Y, U, V in the input's layout (numpy HWC/NHWC, torch
    CHW/NCHW). ``centered=True`` (default) subtracts 128, giving [-128, 127] as the camera path
    delivers; integer inputs then return ``int8`` (else ``uint8``), float inputs ``float32``.
    """
    _check_options(swing, channel_order)
    axis = _channel_axis(x, "rgb_to_yuv444")
    if isinstance(x, torch.Tensor):
        x = x.detach()
    _check_values(x, 0, 255, "rgb_to_yuv444", "[0, 255]")
    is_float = _is_float(x)

    with torch.no_grad():
        xs = _as(x, "float32" if is_float else "int32")
        c0, c1, c2 = _split(xs, axis)
        r, g, b = (c2, c1, c0) if channel_order == "bgr" else (c0, c1, c2)
        coeffs, offsets = _FORWARD[swing]
        out = []
        for (kr, kg, kb), off in zip(coeffs, offsets):
            s = kr * r + kg * g + kb * b  # exact: |s| < 2**16 for integer-valued input
            v = _clip(_round_div256(s) + off, 0, 255)
            out.append(v - 128 if centered else v)
        y = _stack(out, axis)

    if is_float:
        return _as(y, "float32")
    return _as(y, "int8" if centered else "uint8")


def bgr_to_yuv444(x: Array, *, swing: Swing = "full", centered: bool = True) -> Array:
    """:func:`rgb_to_yuv444` for BGR input (e.g. OpenCV images)."""
    return rgb_to_yuv444(x, swing=swing, centered=centered, channel_order="bgr")


def yuv444_to_rgb(
    x: Array,
    *,
    swing: Swing = "full",
    centered: bool = True,
    channel_order: ChannelOrder = "rgb",
) -> Array:
    """Convert YUV444 (Y, U, V channels) back to RGB (or BGR) in [0, 255].

    ``centered=True`` expects [-128, 127] (e.g. ``int8`` from :func:`rgb_to_yuv444`),
    ``centered=False`` expects [0, 255]. Results are rounded half up and clamped to [0, 255];
    integer inputs return ``uint8``, float inputs ``float32``, same layout as the input.
    """
    _check_options(swing, channel_order)
    axis = _channel_axis(x, "yuv444_to_rgb")
    if isinstance(x, torch.Tensor):
        is_uint8, is_int8 = x.dtype == torch.uint8, x.dtype == torch.int8
    else:
        is_uint8, is_int8 = x.dtype == np.uint8, x.dtype == np.int8
    if centered and is_uint8:
        raise ValueError(
            "yuv444_to_rgb: uint8 input cannot hold centered YUV ([-128, 127]); "
            "pass centered=False for uint8 YUV in [0, 255], or int8 centered values"
        )
    if not centered and is_int8:
        raise ValueError(
            "yuv444_to_rgb: int8 input looks like centered YUV; pass centered=True, "
            "or uint8 values in [0, 255] with centered=False"
        )
    if isinstance(x, torch.Tensor):
        x = x.detach()
    lo, hi = (-128, 127) if centered else (0, 255)
    _check_values(x, lo, hi, "yuv444_to_rgb", f"[{lo}, {hi}] (centered={centered})")
    is_float = _is_float(x)

    with torch.no_grad():
        xs = _as(x, "float32")
        y, u, v = _split(xs, axis)
        if centered:
            y = y + _f32(y, 128.0)  # chroma stays centered
        else:
            u = u - _f32(u, 128.0)
            v = v - _f32(v, 128.0)
        ky, yoff, rv, gu, gv, bu = (_f32(xs, c) for c in _INVERSE[swing])
        luma = ky * (y - yoff)
        r = luma + rv * v
        g = luma - gu * u - gv * v
        b = luma + bu * u
        chans = [b, g, r] if channel_order == "bgr" else [r, g, b]
        half = _f32(xs, 0.5)
        out = _stack([_clip(_floor(c + half), 0, 255) for c in chans], axis)

    return _as(out, "float32" if is_float else "uint8")


def yuv444_to_bgr(x: Array, *, swing: Swing = "full", centered: bool = True) -> Array:
    """:func:`yuv444_to_rgb` producing BGR channel order."""
    return yuv444_to_rgb(x, swing=swing, centered=centered, channel_order="bgr")


# --------------------------------------------------------------------------- doctor heuristic

# Thresholds of looks_centered. "Negative share" = sum of |negative values| / sum of |values|,
# i.e. weighted by magnitude, so a few clipped-black pixels of RGB shifted by a tiny amount
# (x - 0.5 on [0, 255] data: 2-4 % of photo pixels are 0) do not count as "centered".
# * _SIGN_SHARE: centered YUV444 of real photos has both signs in bulk: the smaller of the
#   negative and positive shares is 0.18-0.50 on the six sklearn/skimage test photos (0.18 for
#   the dark "rocket"). RGB/BGR or uncentered YUV in [0, 1] or [0, 255] has 0, and RGB shifted by
#   5 of 255 still only 0.0014. 0.02 sits well between.
# * _Y_MEAN_FRAC: the "chroma centered, luma not" mistake (Y left in [0, 255]): channel 0 has a
#   negative share below _SIGN_SHARE and a mean above 0.25 x max|x| (uncentered luma of a photo
#   averages 0.25-0.8 of its maximum). Only channel 0 is tested because warm photos
#   legitimately have V > 0 almost everywhere (coffee: 99.6 % of V > 0, mean 0.30 x max|x|),
#   and only the positive direction, because dark photos have almost no positive luma (rocket:
#   positive share of Y 0.02). A correctly centered batch trips it only when nearly every
#   pixel is brighter than mid-grey (an all-overexposed batch).
# A plain per-channel mean threshold is not used: dark photos are legitimately far from 0 in
# luma (flower, rocket: mean Y - 128 = -0.5 x max|x|), so any threshold low enough to catch
# mis-shifted data flags them, and one high enough to spare them only sees one-signed data,
# which the sign tests above already catch.
_SIGN_SHARE = 0.02
_Y_MEAN_FRAC = 0.25


def _negative_share(a: np.ndarray) -> float:
    return float(np.clip(-a, 0, None).sum() / np.abs(a).sum())


def looks_centered(x: Array) -> tuple[bool, str]:
    """Heuristic for doctor rule QK005: does a network input batch look like centered YUV444?

    ``x`` is what is fed to the QuantStub, N,C,H,W (or C,H,W), torch or numpy, any scale.
    Returns ``(False, reason)`` when it looks un-centered (RGB/BGR in [0, 1] or [0, 255],
    uncentered YUV, a channel left uncentered), else ``(True, "")``.

    It checks centering only, not the colour space: zero-mean data such as ImageNet-normalized
    RGB ``(x / 255 - mean) / std`` passes. A constant batch (e.g. all zeros) carries no
    evidence and also passes.
    """
    if isinstance(x, torch.Tensor):
        a = x.detach().to("cpu", torch.float64).numpy()
    elif isinstance(x, np.ndarray):
        a = x.astype(np.float64)
    else:
        raise ValueError(
            f"looks_centered: expected a torch tensor or numpy array (N,C,H,W), "
            f"got {type(x).__name__}"
        )
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.size == 0:
        raise ValueError(
            f"looks_centered: expected a non-empty N,C,H,W (or C,H,W) batch, got shape {a.shape}"
        )
    if not np.isfinite(a).all():
        raise ValueError("looks_centered: input contains NaN or inf values")

    mn, mx = float(a.min()), float(a.max())
    scale = max(abs(mn), abs(mx))
    if scale == 0:
        return True, ""
    rng = f"values span [{mn:g}, {mx:g}]"
    neg = _negative_share(a)
    if neg < _SIGN_SHARE:
        return False, (
            f"the input is (almost) never negative ({rng}, negative share {neg:.2%}): looks "
            "like RGB/BGR (or uncentered YUV) in [0, 1] or [0, 255]; the camera path feeds "
            "centered YUV444 in [-128, 127] (use qatkit.base.colour.rgb_to_yuv444, centered=True)"
        )
    if 1 - neg < _SIGN_SHARE:
        return False, (
            f"the input is (almost) never positive ({rng}, positive share {1 - neg:.2%}): "
            "the data were shifted too far; centered YUV444 spans [-128, 127] around 0"
        )
    y = a[:, 0]
    y_mean = float(y.mean())
    if y_mean > _Y_MEAN_FRAC * scale and _negative_share(y) < _SIGN_SHARE:
        return False, (
            f"channel 0 (Y) is (almost) never negative (negative share "
            f"{_negative_share(y):.2%}, mean {y_mean:g}, {rng}) while the input as a whole is "
            "centered: Y looks left in [0, 255]; subtract 128 from every channel (ignore this "
            "if the batch really holds only images brighter than mid-grey)"
        )
    return True, ""
