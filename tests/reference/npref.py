"""Independent NumPy reference of the integer arithmetic in docs/fixed-point.md.

Used only by the test suite, to check the torch implementation bit for bit. It is written
from the specification alone (no torch, no ``qatkit`` import), favours literal clarity over
speed, and is meant for small tensors. Integers are int64 arrays; the requantization shift is
done on Python ints so that it is exact at any width. Section numbers in comments ("§4") refer
to docs/fixed-point.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

Scale = float | np.floating
Pair = int | tuple[int, int]
Activation = None | str | tuple[str, float, float]

# §0 table of dtype ranges.
QRANGE: dict[str, tuple[int, int]] = {
    "qint8": (-128, 127),
    "qint16": (-32768, 32767),
    "qint32": (-2147483648, 2147483647),
}

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


# ----------------------------------------------------------------------------- helpers


def _int64(q: ArrayLike) -> np.ndarray:
    return np.asarray(q, dtype=np.int64)


def _pair(v: Pair) -> tuple[int, int]:
    if isinstance(v, int | np.integer):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def _range(dtype: str) -> tuple[int, int]:
    if dtype not in QRANGE:
        raise ValueError(f"unknown dtype {dtype!r}")
    return QRANGE[dtype]


def _scale64(s: Scale) -> float:
    """float64(s) of a per-tensor scale; the spec's scales are float32 numbers (notation)."""
    v = float(s)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"scale must be finite and positive, got {v!r}")
    if float(np.float32(v)) != v:
        # A float64-only scale would make float32 vs float64 evaluation order matter silently.
        raise ValueError(f"scale {v!r} is not a float32 number")
    return v


def _scales64(s: ArrayLike) -> np.ndarray:
    """float64 of a vector of per-channel float32 scales."""
    v = np.asarray(s, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError("per-channel scales must be a 1-D array")
    if not np.all(np.isfinite(v) & (v > 0.0)):
        raise ValueError("scales must be finite and positive")
    if not np.array_equal(v.astype(np.float32).astype(np.float64), v):
        raise ValueError("per-channel scales are not float32 numbers")
    return v


def _is_vector(s: Scale | ArrayLike) -> bool:
    return np.ndim(s) > 0


def _round_sat(x: ArrayLike, dtype: str) -> np.ndarray:
    """sat_T(round_half_even(x)) for float64 x.

    Clipping to the integer bounds before rounding gives the same result (rounding is
    monotone and fixes integers) and keeps an overflowed +-inf quotient representable.
    """
    x = np.asarray(x, dtype=np.float64)
    if np.any(np.isnan(x)):
        raise ValueError("NaN cannot be quantized")
    lo, hi = _range(dtype)
    return round_half_even(np.clip(x, float(lo), float(hi)))


def _rhe_int(x: float) -> int:
    return int(round_half_even(np.float64(x)))


def _channel_index(ndim: int, axis: int, c: int) -> tuple:
    idx: list = [slice(None)] * ndim
    idx[axis] = c
    return tuple(idx)


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for {ndim}-D array")
    return axis % ndim


def _objects_to_int64(r: ArrayLike) -> np.ndarray:
    """Python-int (object) array -> int64, refusing silent wrap-around."""
    r = np.asarray(r, dtype=object)
    for x in r.flat:
        if not _INT64_MIN <= int(x) <= _INT64_MAX:
            raise OverflowError(f"requant result {x} does not fit int64")
    return r.astype(np.int64)


# ----------------------------------------------------------------------------- §0, §2, §3


def sat(v: ArrayLike, dtype: str) -> np.ndarray:
    """sat_T: clamp into the range of dtype T (§0)."""
    lo, hi = _range(dtype)
    return np.clip(_int64(v), lo, hi)


def round_half_even(x: ArrayLike) -> np.ndarray:
    """Round float64 values to the nearest integer, ties to even, as int64."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("round_half_even needs finite values")
    # Work on |x|: for a >= 0, a - floor(a) is exact in float64 (no rounding of the fraction).
    a = np.abs(x)
    fl = np.floor(a)
    frac = a - fl
    odd = np.fmod(fl, 2.0) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    r = np.where(x < 0, -(fl + up), fl + up)
    if np.any(np.abs(r) >= 2.0**63):
        raise OverflowError("value too large to round into int64")
    return r.astype(np.int64)


def scale_from_range(lo: float, hi: float, dtype: str, pow2: bool = False) -> np.float32:
    """Scale from an observed range [lo, hi] (§2)."""
    qmin, qmax = _range(dtype)
    lo, hi = float(lo), float(hi)
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError("range contains NaN")
    t = max(abs(lo), abs(hi))
    # §2: the division is a float64 division of the given (Python float) t, rounded once to float32.
    s = np.float32(t / ((qmax - qmin) / 2))
    s = max(s, np.float32(2.0**-40))
    if pow2:
        shift = min(max(math.floor(-math.log2(float(s))), 1), 14)
        s = np.float32(2.0**-shift)
    return np.float32(s)


def quantize(x: ArrayLike, s: Scale, dtype: str) -> np.ndarray:
    """q = sat_T(round_half_even(float32(x) / s)), division in float32 (§3)."""
    s32 = np.float32(_scale64(s))
    x32 = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        quotient = x32 / s32  # float32 / float32 -> float32, IEEE round to nearest
    assert quotient.dtype == np.float32
    return _round_sat(quotient.astype(np.float64), dtype)


def dequantize(q: ArrayLike, s: Scale | ArrayLike, axis: int | None = None) -> np.ndarray:
    """x = float32(float64(q) * float64(s)); per-channel s along `axis` (§3)."""
    q64 = _int64(q).astype(np.float64)
    if _is_vector(s):
        if axis is None:
            raise ValueError("per-channel scale needs an axis")
        axis = _normalize_axis(axis, q64.ndim)
        sv = _scales64(s)
        shape = [1] * q64.ndim
        shape[axis] = sv.size
        prod = q64 * sv.reshape(shape)
    else:
        prod = q64 * _scale64(s)
    return prod.astype(np.float32)


# ----------------------------------------------------------------------------- §4


def multiplier(M: float) -> tuple[int, int]:
    """Encode a real multiplier M as (m, n) with M ~= m * 2**-n, 2**14 <= |m| < 2**15 (§4)."""
    M = float(M)
    if not math.isfinite(M):
        raise ValueError(f"multiplier must be finite, got {M!r}")
    if M == 0.0:
        return 0, 0
    f, e = math.frexp(M)
    m = _rhe_int(f * 2.0**15)  # exact product: f has 53 bits, times a power of two
    n = 15 - e
    if abs(m) == 2**15:
        m = m // 2  # exact: m is +-2**15
        n = n - 1
    return m, n


def _requant_one(v: np.ndarray, M: float) -> np.ndarray:
    """requant with one multiplier, returning Python ints (object array)."""
    m, n = multiplier(M)
    if isinstance(v, np.ndarray) and v.dtype == object:  # Python ints already (any width)
        vo = v
    else:
        vo = np.asarray(v, dtype=np.int64).astype(object)  # Python ints: no overflow, >> floors
    if n >= 1:
        return np.asarray((vo * m + (1 << (n - 1))) >> n, dtype=object)
    return np.asarray(vo * m * (1 << (-n)), dtype=object)


def requant(v: ArrayLike, M: float | ArrayLike, axis: int | None = None) -> np.ndarray:
    """floor(v * m / 2**n + 1/2), no saturation; per-channel M along `axis` (§4)."""
    v = _int64(v)
    if not _is_vector(M):
        return _objects_to_int64(_requant_one(v, float(M)))
    Mv = np.asarray(M, dtype=np.float64)
    if Mv.ndim != 1:
        raise ValueError("per-channel multipliers must be 1-D")
    if axis is None:
        raise ValueError("per-channel multipliers need an axis")
    axis = _normalize_axis(axis, v.ndim)
    if v.shape[axis] != Mv.size:
        raise ValueError(f"{Mv.size} multipliers for {v.shape[axis]} channels")
    out = np.empty(v.shape, dtype=object)
    for c in range(Mv.size):
        idx = _channel_index(v.ndim, axis, c)
        out[idx] = _requant_one(v[idx], float(Mv[c]))
    return _objects_to_int64(out)


# ----------------------------------------------------------------------------- §5, §7


def quantize_weight(w: ArrayLike, s_w: ArrayLike, dtype: str = "qint8") -> np.ndarray:
    """q_w = sat_T(round_half_even(float32(w) / s_w[c])), c = axis 0, float32 division, T the
    weight dtype qint8 or qint16 (§5)."""
    w32 = np.asarray(w, dtype=np.float32)
    sv = _scales64(s_w).astype(np.float32)
    if w32.shape[0] != sv.size:
        raise ValueError(f"{sv.size} weight scales for {w32.shape[0]} output channels")
    q = np.empty(w32.shape, dtype=np.int64)
    for c in range(sv.size):
        with np.errstate(over="ignore"):
            quotient = w32[c] / sv[c]
        q[c] = _round_sat(quotient.astype(np.float64), dtype)
    return q


def _quantize_weight_transposed(w: np.ndarray, s_w: ArrayLike, groups: int,
                                dtype: str = "qint8") -> np.ndarray:
    """ConvTranspose2d weight (Cin, Cout/groups, kh, kw): channel axis 1 (§5).

    §5 gives s_w one entry per output channel; with groups, input channel ci of group g and
    axis-1 index j feed output channel g * Cout/groups + j, so that is the scale used.
    """
    w32 = np.asarray(w, dtype=np.float32)
    sv = _scales64(s_w).astype(np.float32)
    cin, cout_g = w32.shape[0], w32.shape[1]
    if sv.size != cout_g * groups:
        raise ValueError(f"{sv.size} weight scales for {cout_g * groups} output channels")
    cin_g = cin // groups
    q = np.empty(w32.shape, dtype=np.int64)
    for ci in range(cin):
        g = ci // cin_g
        for j in range(cout_g):
            with np.errstate(over="ignore"):
                quotient = w32[ci, j] / sv[g * cout_g + j]
            q[ci, j] = _round_sat(quotient.astype(np.float64), dtype)
    return q


class Refused(Exception):
    """The spec says the fixed-point model must refuse this case (a number its dtype cannot
    hold, §5) instead of computing it."""


def weight_scales(w: ArrayLike, b: ArrayLike | None, pow2: bool = False,
                  dtype: str = "qint8") -> np.ndarray:
    """Per-output-channel (axis 0) weight scales (§2, §5): from the channel's range, or, for a
    channel whose weights are all zero, from |b[c]| as if it were the channel's range."""
    w32 = np.asarray(w, dtype=np.float32)
    flat = w32.reshape(w32.shape[0], -1)
    out = []
    for c in range(flat.shape[0]):
        lo, hi = float(flat[c].min()), float(flat[c].max())
        if lo == 0.0 and hi == 0.0 and b is not None:
            lo = hi = float(np.float32(np.asarray(b, dtype=np.float32)[c]))
        out.append(scale_from_range(lo, hi, dtype, pow2))
    return np.array(out, dtype=np.float32)


def quantize_bias(b: ArrayLike, s_in: Scale, s_w: ArrayLike) -> np.ndarray:
    """The int32 bias q_b[c] = round_half_even(float64(b[c]) / (float64(s_in) *
    float64(s_w[c]))); a value outside qint32 is refused (an int32 bias tensor, as exporters
    and QDQ formats hold it; the ops themselves take :func:`bias_integers`)."""
    b64 = np.asarray(b, dtype=np.float32).astype(np.float64)
    sv = _scales64(s_w)
    if b64.shape != sv.shape:
        raise ValueError("bias and weight scales must have one entry per output channel")
    q = np.empty(b64.shape, dtype=np.int64)
    lo, hi = _range("qint32")
    for c in range(sv.size):
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            x = b64[c] / (_scale64(s_in) * sv[c])
        r = int(round_half_even(np.clip(x, -2.0**40, 2.0**40))) if np.isfinite(x) else None
        if r is None or not lo <= r <= hi:
            raise Refused(f"bias of channel {c} is beyond int32 at s_in * s_w")
        q[c] = r
    return q


def bias_integers(b: ArrayLike, s_in: Scale, s_w: ArrayLike) -> list[int]:
    """q_b[c] = round_half_even(float64(b[c]) / (float64(s_in) * float64(s_w[c]))) as Python
    ints of any size (§5: a conv/linear adds it exactly, int32 or not); a quotient that is not
    finite is refused."""
    b64 = np.asarray(b, dtype=np.float32).astype(np.float64)
    sv = _scales64(s_w)
    if b64.shape != sv.shape:
        raise ValueError("bias and weight scales must have one entry per output channel")
    out = []
    for c in range(sv.size):
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            x = b64[c] / (_scale64(s_in) * sv[c])
        if not np.isfinite(x):
            raise Refused(f"bias of channel {c} is not finite at s_in * s_w")
        # from 2^52 on, a float64 is an integer: no rounding left to do
        out.append(int(x) if abs(x) >= 2.0**52 else _rhe_int(float(x)))
    return out


def int32_shifts(q_b: Sequence[int]) -> list[int]:
    """§5: the right shift k[c] of an int32 (accumulator / high-precision) output whose bias
    q_b[c] is beyond int32: bitlen(|q_b[c]|) - 29; 0 for a bias that fits."""
    lo, hi = _range("qint32")
    return [0 if lo <= q <= hi else abs(q).bit_length() - 29 for q in q_b]


def accumulator_output_scale(b: ArrayLike | None, s_in: Scale, s_w: ArrayLike) -> np.ndarray:
    """Scale of the int32 output (§5): s_acc[c] * 2^k[c], k from :func:`int32_shifts`."""
    s_acc = accumulator_scale(s_in, s_w)
    if b is None:
        return s_acc
    k = np.array(int32_shifts(bias_integers(b, s_in, s_w)), dtype=np.float64)
    return (s_acc.astype(np.float64) * 2.0**k).astype(np.float32)


def accumulator_scale(s_in: Scale, s_w: ArrayLike) -> np.ndarray:
    """s_acc[c] = float32(float64(s_in) * float64(s_w[c])) (§5)."""
    return (_scale64(s_in) * _scales64(s_w)).astype(np.float32)


def _product_multipliers(s_in: Scale, s_w: ArrayLike, s_out: Scale) -> np.ndarray:
    """M[c] = float64(s_in) * float64(s_w[c]) / float64(s_out), left to right (§4, §5)."""
    return (_scale64(s_in) * _scales64(s_w)) / _scale64(s_out)


def relu(q: ArrayLike) -> np.ndarray:
    """max(q, 0), scale unchanged (§7)."""
    return np.maximum(_int64(q), 0)


def _clamp(q: np.ndarray, lo: int, hi: int) -> np.ndarray:
    # Bounds can exceed int64 for a tiny scale; clipping them to int64 changes no int64 value.
    lo = min(max(lo, _INT64_MIN), _INT64_MAX)
    hi = min(max(hi, _INT64_MIN), _INT64_MAX)
    return np.minimum(np.maximum(q, np.int64(lo)), np.int64(hi))


def _activation_bounds(activation: Activation) -> tuple[float, float] | None:
    if activation is None or activation == "relu":
        return None
    if activation == "relu6":
        return 0.0, 6.0
    if isinstance(activation, tuple) and len(activation) == 3 and activation[0] == "hardtanh":
        return float(activation[1]), float(activation[2])
    raise ValueError(f"unknown activation {activation!r}")


def _fused_activation(q: np.ndarray, activation: Activation, s_o: Scale, dtype: str) -> np.ndarray:
    """Fused activation after the requant to s_o (§7)."""
    if activation is None:
        return q
    if activation == "relu":
        return relu(q)
    lo, hi = _activation_bounds(activation)  # type: ignore[misc]
    # §7 writes lo / s_o without a precision; scales enter real arithmetic as float64 (§4).
    q_lo = int(_round_sat(lo / _scale64(s_o), dtype))
    q_hi = int(_round_sat(hi / _scale64(s_o), dtype))
    return _clamp(q, q_lo, q_hi)


def clamp_act(
    q: ArrayLike, s_in: Scale, lo: float, hi: float, s_o: Scale, out_dtype: str
) -> np.ndarray:
    """Standalone ReLU6 / Hardtanh with its own output scale (§7)."""
    # §7: the standalone bounds are not saturated, only the requantized result is.
    q_lo = _rhe_int(float(lo) / _scale64(s_in))
    q_hi = _rhe_int(float(hi) / _scale64(s_in))
    clamped = _clamp(_int64(q), q_lo, q_hi)
    return sat(requant(clamped, _scale64(s_in) / _scale64(s_o)), out_dtype)


def _finish(
    acc: np.ndarray,
    q_b: list[int] | None,
    s_in: Scale,
    s_w: ArrayLike,
    s_out: Scale,
    out_dtype: str,
    channel_axis: int,
    activation: Activation,
    mode: str,
) -> np.ndarray:
    """Role-dependent output of conv/linear (§5) from the sum without bias (int64) and the
    bias integers q_b (any size): acc = q_b + sum on Python ints, exact at any width."""
    if mode not in ("accumulator", "quantized"):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "accumulator" and activation is not None:
        # §5 defines the high-precision output as acc itself; no activation is specified.
        raise ValueError("a fused activation is not defined for the accumulator output")
    axis = _normalize_axis(channel_axis, acc.ndim)
    C = acc.shape[axis]
    qb = list(q_b) if q_b is not None else [0] * C
    shifts = int32_shifts(qb)
    M = _product_multipliers(s_in, s_w, s_out) if mode == "quantized" else None
    out = np.empty(acc.shape, dtype=object)
    for c in range(C):
        idx = _channel_index(acc.ndim, axis, c)
        v = _int64(acc[idx]).astype(object) + qb[c]
        if mode == "accumulator":
            k = shifts[c]  # §5: an int32 output of a bias beyond int32 is shifted right by k
            out[idx] = v if k == 0 else (v + (1 << (k - 1))) >> k
        else:
            lo, hi = _range(out_dtype)
            r = _requant_one(v, float(M[c]))
            out[idx] = np.asarray([min(max(int(t), lo), hi) for t in r.flat],
                                  dtype=object).reshape(r.shape)
    if mode == "accumulator":
        lo, hi = _range("qint32")
        if out.size and (min(out.flat) < lo or max(out.flat) > hi):  # §5: refused, never
            raise Refused("the int32 output cannot hold the accumulator")  # saturated
        return out.astype(np.int64)
    return _fused_activation(out.astype(np.int64), activation, s_out, out_dtype)


# ----------------------------------------------------------------------------- §5 conv / linear


def conv2d_acc(
    q_in: ArrayLike,
    q_w: ArrayLike,
    q_b: ArrayLike | None,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
) -> np.ndarray:
    """acc[n, o] = q_b[o] + sum(q_in * q_w[o]) over the window, exact int64, zero padding (§5)."""
    x = _int64(q_in)
    w = _int64(q_w)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    N, C, H, W = x.shape
    Cout, Cg, kh, kw = w.shape
    if Cg * groups != C or Cout % groups != 0:
        raise ValueError("channel counts do not match groups")
    Og = Cout // groups
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # zero padding: q = 0
    acc = np.zeros((N, Cout, Ho, Wo), dtype=np.int64)
    for g in range(groups):
        cin = slice(g * Cg, (g + 1) * Cg)
        cout = slice(g * Og, (g + 1) * Og)
        for i in range(kh):
            for j in range(kw):
                # Input samples seen by tap (i, j) at every output position.
                r0, c0 = i * dh, j * dw
                patch = xp[
                    :, cin, r0 : r0 + sh * (Ho - 1) + 1 : sh, c0 : c0 + sw * (Wo - 1) + 1 : sw
                ]
                acc[:, cout] += np.einsum("nchw,oc->nohw", patch, w[cout, :, i, j])
    if q_b is not None:
        acc += _int64(q_b).reshape(1, Cout, 1, 1)
    return acc


def conv2d(
    q_in: ArrayLike,
    s_in: Scale,
    w: ArrayLike,
    b: ArrayLike | None,
    s_w: ArrayLike,
    s_out: Scale,
    out_dtype: str,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
    activation: Activation = None,
    mode: str = "quantized",
    w_dtype: str = "qint8",
) -> np.ndarray:
    """Quantized Conv2d from float weights (§5); mode "accumulator" is the high-precision output."""
    q_w = quantize_weight(w, s_w, w_dtype)
    q_b = None if b is None else bias_integers(b, s_in, s_w)
    acc = conv2d_acc(q_in, q_w, None, stride, padding, dilation, groups)
    return _finish(acc, q_b, s_in, s_w, s_out, out_dtype, 1, activation, mode)


def linear(
    q_in: ArrayLike,
    s_in: Scale,
    w: ArrayLike,
    b: ArrayLike | None,
    s_w: ArrayLike,
    s_out: Scale,
    out_dtype: str,
    activation: Activation = None,
    mode: str = "quantized",
    w_dtype: str = "qint8",
) -> np.ndarray:
    """Quantized Linear (§5): acc[..., o] = q_b[o] + sum_k q_in[..., k] * q_w[o, k]."""
    x = _int64(q_in)
    q_w = quantize_weight(w, s_w, w_dtype)
    acc = np.einsum("...k,ok->...o", x, q_w)  # int64 einsum: exact
    q_b = None if b is None else bias_integers(b, s_in, s_w)
    # §1: the linear accumulator's channel axis is the last one.
    return _finish(acc, q_b, s_in, s_w, s_out, out_dtype, -1, activation, mode)


def conv_transpose2d(
    q_in: ArrayLike,
    s_in: Scale,
    w: ArrayLike,
    b: ArrayLike | None,
    s_w: ArrayLike,
    s_out: Scale,
    out_dtype: str,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    output_padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
    mode: str = "quantized",
    activation: Activation = None,
    w_dtype: str = "qint8",
) -> np.ndarray:
    """Quantized ConvTranspose2d (§5) by scattering every input sample into the output."""
    x = _int64(q_in)
    q_w = _quantize_weight_transposed(np.asarray(w), s_w, groups, w_dtype)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    oph, opw = _pair(output_padding)
    dh, dw = _pair(dilation)
    N, Cin, H, W = x.shape
    Cin_w, Og, kh, kw = q_w.shape
    if Cin != Cin_w or Cin % groups != 0:
        raise ValueError("channel counts do not match groups")
    Cg = Cin // groups
    Cout = Og * groups
    Ho = (H - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    Wo = (W - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    acc = np.zeros((N, Cout, Ho, Wo), dtype=np.int64)
    for g in range(groups):
        cin = slice(g * Cg, (g + 1) * Cg)
        cout = slice(g * Og, (g + 1) * Og)
        for ih in range(H):
            for iw in range(W):
                for i in range(kh):
                    oh = ih * sh - ph + i * dh
                    if not 0 <= oh < Ho:
                        continue
                    for j in range(kw):
                        ow = iw * sw - pw + j * dw
                        if not 0 <= ow < Wo:
                            continue
                        acc[:, cout, oh, ow] += np.einsum(
                            "nc,co->no", x[:, cin, ih, iw], q_w[cin, :, i, j]
                        )
    q_b = None if b is None else bias_integers(b, s_in, s_w)
    return _finish(acc, q_b, s_in, s_w, s_out, out_dtype, 1, activation, mode)


# ----------------------------------------------------------------------------- §6


def _to_intermediate(
    q: ArrayLike, s: Scale | ArrayLike, s_o: Scale, axis: int | None
) -> np.ndarray:
    """requant(q, s / s_i), s / s_i evaluated as float64(s) / (float64(s_o) / 256) (§6)."""
    s_i = _scale64(s_o) / 256
    if _is_vector(s):
        return requant(q, _scales64(s) / s_i, axis=axis)
    return requant(q, _scale64(s) / s_i)


def _from_intermediate(v: np.ndarray, s_o: Scale, out_dtype: str) -> np.ndarray:
    """sat_T(requant(v, s_i / s_o)), M evaluated as float64(s_o) / 256 / float64(s_o) (§6)."""
    M = _scale64(s_o) / 256 / _scale64(s_o)
    return sat(requant(v, M), out_dtype)


def add(
    q_a: ArrayLike,
    s_a: Scale | ArrayLike,
    q_b: ArrayLike,
    s_b: Scale | ArrayLike,
    s_o: Scale,
    out_dtype: str,
    relu: bool = False,
    sub: bool = False,
    axis_a: int | None = None,
    axis_b: int | None = None,
) -> np.ndarray:
    """Add / sub through the intermediate scale s_o / 256 (§6); fused ReLU after saturation."""
    a_i = _to_intermediate(q_a, s_a, s_o, axis_a)
    b_i = _to_intermediate(q_b, s_b, s_o, axis_b)
    combined = a_i - b_i if sub else a_i + b_i
    q = _from_intermediate(combined, s_o, out_dtype)
    return np.maximum(q, 0) if relu else q


def add_scalar(q_a: ArrayLike, s_a: Scale, c: float, s_o: Scale, out_dtype: str) -> np.ndarray:
    """x + c (§6): b_i = round_half_even(float64(c) / (float64(s_o) / 256)), not saturated."""
    a_i = _to_intermediate(q_a, s_a, s_o, None)
    b_i = _rhe_int(float(c) / (_scale64(s_o) / 256))
    return _from_intermediate(a_i + b_i, s_o, out_dtype)


# ----------------------------------------------------------------------------- §8


def _rescale(q: ArrayLike, s: Scale, s_o: Scale, out_dtype: str) -> np.ndarray:
    """sat_T(requant(q, s / s_o))."""
    return sat(requant(q, _scale64(s) / _scale64(s_o)), out_dtype)


def mul(
    q_a: ArrayLike, s_a: Scale, q_b: ArrayLike, s_b: Scale, s_o: Scale, out_dtype: str
) -> np.ndarray:
    """q_o = sat_T(requant(q_a * q_b, s_a * s_b / s_o)) (§8)."""
    M = _scale64(s_a) * _scale64(s_b) / _scale64(s_o)
    return sat(requant(_int64(q_a) * _int64(q_b), M), out_dtype)


def mul_scalar(q_a: ArrayLike, s_a: Scale, c: float, s_o: Scale, out_dtype: str) -> np.ndarray:
    """q_o = sat_T(requant(q_a, float64(s_a) * float64(c) / float64(s_o))), M may be <= 0 (§8)."""
    M = _scale64(s_a) * float(c) / _scale64(s_o)
    return sat(requant(q_a, M), out_dtype)


def matmul(
    q_a: ArrayLike, s_a: Scale, q_b: ArrayLike, s_b: Scale, s_o: Scale, out_dtype: str
) -> np.ndarray:
    """acc = sum_k q_a[.., i, k] * q_b[.., k, j] exact, then requant by s_a * s_b / s_o (§8)."""
    acc = np.matmul(_int64(q_a), _int64(q_b))  # integer matmul: exact int64 loops, no BLAS
    M = _scale64(s_a) * _scale64(s_b) / _scale64(s_o)
    return sat(requant(acc, M), out_dtype)


def _reduced_count(shape: tuple[int, ...], dim: int | Sequence[int] | None) -> int:
    if dim is None:
        return int(np.prod(shape, dtype=np.int64))
    dims = (dim,) if isinstance(dim, int | np.integer) else tuple(dim)
    return int(np.prod([shape[_normalize_axis(int(d), len(shape))] for d in dims], dtype=np.int64))


def _axes(dim: int | Sequence[int] | None) -> int | tuple[int, ...] | None:
    if dim is None or isinstance(dim, int | np.integer):
        return dim
    return tuple(int(d) for d in dim)


def sum_(
    q: ArrayLike,
    s: Scale,
    dim: int | Sequence[int] | None,
    keepdim: bool,
    s_o: Scale,
    out_dtype: str,
) -> np.ndarray:
    """acc = sum q (int64), q_o = sat_T(requant(acc, s / s_o)) (§8)."""
    acc = np.sum(_int64(q), axis=_axes(dim), keepdims=keepdim, dtype=np.int64)
    return _rescale(acc, s, s_o, out_dtype)


def mean(
    q: ArrayLike,
    s: Scale,
    dim: int | Sequence[int] | None,
    keepdim: bool,
    s_o: Scale,
    out_dtype: str,
) -> np.ndarray:
    """Sum, then requant by M = float64(s) / float64(n) / float64(s_o) (§8)."""
    q = _int64(q)
    acc = np.sum(q, axis=_axes(dim), keepdims=keepdim, dtype=np.int64)
    n = _reduced_count(q.shape, dim)
    M = _scale64(s) / float(n) / _scale64(s_o)
    return sat(requant(acc, M), out_dtype)


def maximum(
    q_a: ArrayLike, s_a: Scale, q_b: ArrayLike, s_b: Scale, s_o: Scale, out_dtype: str
) -> np.ndarray:
    """max of both operands, each first brought to s_o and saturated (§8)."""
    return np.maximum(_rescale(q_a, s_a, s_o, out_dtype), _rescale(q_b, s_b, s_o, out_dtype))


def minimum(
    q_a: ArrayLike, s_a: Scale, q_b: ArrayLike, s_b: Scale, s_o: Scale, out_dtype: str
) -> np.ndarray:
    """min of both operands, each first brought to s_o and saturated (§8)."""
    return np.minimum(_rescale(q_a, s_a, s_o, out_dtype), _rescale(q_b, s_b, s_o, out_dtype))


def cat(
    qs: Sequence[ArrayLike], ss: Sequence[Scale], dim: int, s_o: Scale, out_dtype: str
) -> np.ndarray:
    """Every input sat_T(requant(q_k, s_k / s_o)), then concatenated (§8)."""
    if len(qs) != len(ss):
        raise ValueError("one scale per input")
    return np.concatenate([_rescale(q, s, s_o, out_dtype) for q, s in zip(qs, ss)], axis=dim)


def stack(
    qs: Sequence[ArrayLike], ss: Sequence[Scale], dim: int, s_o: Scale, out_dtype: str
) -> np.ndarray:
    """Every input sat_T(requant(q_k, s_k / s_o)), then stacked (§8)."""
    if len(qs) != len(ss):
        raise ValueError("one scale per input")
    return np.stack([_rescale(q, s, s_o, out_dtype) for q, s in zip(qs, ss)], axis=dim)


# ----------------------------------------------------------------------------- §9 pooling


def _pool_out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size; a ceil-mode window must start inside input or left pad."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def max_pool2d(
    q: ArrayLike,
    kernel: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
    dilation: Pair = 1,
    ceil_mode: bool = False,
) -> np.ndarray:
    """Max over the valid (non-padding) positions of each window; integers unchanged (§7)."""
    x = _int64(q)
    kh, kw = _pair(kernel)
    sh, sw = _pair(kernel if stride is None else stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    N, C, H, W = x.shape
    Ho = _pool_out_size(H, kh, sh, ph, dh, ceil_mode)
    Wo = _pool_out_size(W, kw, sw, pw, dw, ceil_mode)
    out = np.empty((N, C, Ho, Wo), dtype=np.int64)
    for oh in range(Ho):
        rows = [r for r in (oh * sh - ph + i * dh for i in range(kh)) if 0 <= r < H]
        for ow in range(Wo):
            cols = [c for c in (ow * sw - pw + j * dw for j in range(kw)) if 0 <= c < W]
            if not rows or not cols:
                raise ValueError("pooling window has no valid input position")
            out[:, :, oh, ow] = x[:, :, rows][:, :, :, cols].max(axis=(2, 3))
    return out


def _window_sums(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> np.ndarray:
    """Sum of each kh x kw window over the zero-padded input (int64)."""
    N, C, H, W = x.shape
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    acc = np.zeros((N, C, Ho, Wo), dtype=np.int64)
    for oh in range(Ho):
        for ow in range(Wo):
            window = xp[:, :, oh * sh : oh * sh + kh, ow * sw : ow * sw + kw]
            acc[:, :, oh, ow] = window.sum(axis=(2, 3), dtype=np.int64)
    return acc


def avg_pool2d(
    q: ArrayLike,
    s_in: Scale,
    kernel: Pair,
    stride: Pair | None,
    padding: Pair,
    s_o: Scale,
    out_dtype: str,
) -> np.ndarray:
    """count_include_pad=True: M = float64(s_in) / float64(kh * kw) / float64(s_o) (§9)."""
    kh, kw = _pair(kernel)
    sh, sw = _pair(kernel if stride is None else stride)
    ph, pw = _pair(padding)
    acc = _window_sums(_int64(q), kh, kw, sh, sw, ph, pw)
    M = _scale64(s_in) / float(kh * kw) / _scale64(s_o)
    return sat(requant(acc, M), out_dtype)


def adaptive_avg_pool2d(
    q: ArrayLike, s_in: Scale, out_hw: Pair, s_o: Scale, out_dtype: str
) -> np.ndarray:
    """Adaptive average pool for input sizes that are multiples of the output size (§9)."""
    x = _int64(q)
    Ho, Wo = _pair(out_hw)
    H, W = x.shape[-2:]
    if Ho <= 0 or Wo <= 0 or H % Ho != 0 or W % Wo != 0:
        raise ValueError(f"input {H}x{W} is not a multiple of output {Ho}x{Wo}")
    kh, kw = H // Ho, W // Wo
    acc = _window_sums(x, kh, kw, kh, kw, 0, 0)
    M = _scale64(s_in) / float(kh * kw) / _scale64(s_o)
    return sat(requant(acc, M), out_dtype)


# ----------------------------------------------------------------------------- §9 resizing


def upsample_nearest(q: ArrayLike, scale_factor: int) -> np.ndarray:
    """Nearest upsample by an integer factor: each sample repeated, integers unchanged (§7)."""
    if int(scale_factor) != scale_factor or scale_factor < 1:
        raise ValueError("scale_factor must be a positive integer")
    k = int(scale_factor)
    return np.repeat(np.repeat(_int64(q), k, axis=-2), k, axis=-1)


def _bilinear_taps(
    size_in: int, size_out: int, align_corners: bool
) -> list[tuple[int, int, int, int]]:
    """Per output index: (i0, i1, w0, w1) with w0 + w1 = 256 (§9)."""
    taps = []
    if align_corners:
        # PyTorch computes the scale first, then multiplies it by the index.
        scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    else:
        scale = size_in / size_out
    for dst in range(size_out):
        # align_corners=False clamps a negative source coordinate at 0.
        src = dst * scale if align_corners else max((dst + 0.5) * scale - 0.5, 0.0)
        i0 = math.floor(src)
        i1 = min(i0 + 1, size_in - 1)
        w1 = _rhe_int((src - i0) * 256)
        taps.append((i0, i1, 256 - w1, w1))
    return taps


def upsample_bilinear(
    q: ArrayLike,
    s_in: Scale,
    out_hw: Pair,
    align_corners: bool,
    s_o: Scale,
    out_dtype: str,
) -> np.ndarray:
    """acc = sum of the 4 taps q * wy * wx, then requant by float64(s_in) / 65536 / float64(s_o)."""
    x = _int64(q)
    Ho, Wo = _pair(out_hw)
    H, W = x.shape[-2:]
    ty = _bilinear_taps(H, Ho, align_corners)
    tx = _bilinear_taps(W, Wo, align_corners)
    acc = np.zeros((*x.shape[:-2], Ho, Wo), dtype=np.int64)
    for oh, (y0, y1, wy0, wy1) in enumerate(ty):
        for ow, (x0, x1, wx0, wx1) in enumerate(tx):
            acc[..., oh, ow] = (
                x[..., y0, x0] * (wy0 * wx0)
                + x[..., y0, x1] * (wy0 * wx1)
                + x[..., y1, x0] * (wy1 * wx0)
                + x[..., y1, x1] * (wy1 * wx1)
            )
    M = _scale64(s_in) / 65536 / _scale64(s_o)
    return sat(requant(acc, M), out_dtype)


# ----------------------------------------------------------------------------- §10


def _lut_function(kind: str, x: np.ndarray) -> np.ndarray:
    """f of §10 in float64, formulas exactly as written there."""
    with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative x gives the right limit
        if kind == "sigmoid":
            return 1.0 / (1.0 + np.exp(-x))
        if kind == "tanh":
            return np.tanh(x)
        if kind == "silu":
            return x / (1.0 + np.exp(-x))
        if kind == "hardswish":
            return x * np.minimum(np.maximum(x + 3.0, 0.0), 6.0) / 6.0
        if kind == "hardsigmoid":
            return np.minimum(np.maximum(x + 3.0, 0.0), 6.0) / 6.0
        if kind == "gelu":
            erfc = np.vectorize(math.erfc, otypes=[np.float64])
            return 0.5 * x * erfc(-x / math.sqrt(2.0))
        if kind == "gelu_tanh":
            c = 2.0 * math.sqrt(2.0 / math.pi)
            return x / (1.0 + np.exp(-c * (x + 0.044715 * x * x * x)))
    raise ValueError(f"unknown LUT kind {kind!r}")


def lut(
    kind: str, s_in: Scale, in_dtype: str, s_o: Scale, out_dtype: str
) -> tuple[np.ndarray, int]:
    """Table over every input q in [qmin, qmax]; entry q sits at index q - qmin (§10)."""
    if in_dtype not in ("qint8", "qint16"):
        raise ValueError("LUT inputs are qint8 or qint16")
    qmin, qmax = _range(in_dtype)
    q = np.arange(qmin, qmax + 1, dtype=np.int64)
    x = q.astype(np.float64) * _scale64(s_in)
    table = _round_sat(_lut_function(kind, x) / _scale64(s_o), out_dtype)
    return table, qmin


def apply_lut(
    q: ArrayLike, kind: str, s_in: Scale, in_dtype: str, s_o: Scale, out_dtype: str
) -> np.ndarray:
    """q_o = table[q_in] (§10)."""
    table, qmin = lut(kind, s_in, in_dtype, s_o, out_dtype)
    q = _int64(q)
    lo, hi = _range(in_dtype)
    if np.any((q < lo) | (q > hi)):
        raise ValueError(f"input outside the {in_dtype} range")
    return table[q - qmin]


# ----------------------------------------------------------------------------- §14


def prelu(
    q: ArrayLike, s_in: Scale, slope: float | ArrayLike, s_o: Scale, out_dtype: str
) -> np.ndarray:
    """q >= 0: requant(q, s_in / s_o); q < 0: requant(q, s_in * a[c] / s_o), a[c] along axis 1
    (one slope: every element); then sat_T (§14)."""
    q = _int64(q)
    a = np.asarray(slope, dtype=np.float32).astype(np.float64).reshape(-1)
    pos = requant(q, _scale64(s_in) / _scale64(s_o))
    if a.size == 1:
        neg = requant(q, _scale64(s_in) * float(a[0]) / _scale64(s_o))
    else:
        if q.ndim < 2 or q.shape[1] != a.size:
            raise ValueError(f"{a.size} slopes for shape {q.shape}")
        neg = requant(q, (_scale64(s_in) * a) / _scale64(s_o), axis=1)
    return sat(np.where(q >= 0, pos, neg), out_dtype)


# ----------------------------------------------------------------------------- §15


def softmax(q: ArrayLike, s_in: Scale, in_dtype: str, dim: int, s_o: Scale,
            out_dtype: str) -> np.ndarray:
    """Q15 exp table by distance to the maximum, Q30 division half up, requant (§15)."""
    q = _int64(q)
    qmin, qmax = _range(in_dtype)
    if np.any((q < qmin) | (q > qmax)):
        raise ValueError(f"input outside the {in_dtype} range")
    k = np.arange(qmax - qmin + 1, dtype=np.int64).astype(np.float64)
    table = [int(v) for v in round_half_even(2.0**15 * np.exp(-k * _scale64(s_in)))]
    moved = np.moveaxis(q, dim, -1)
    r = np.empty(moved.shape, dtype=np.int64)
    for idx in np.ndindex(moved.shape[:-1]):
        row = [int(v) for v in moved[idx]]
        top = max(row)
        e = [table[top - v] for v in row]
        total = sum(e)
        if total * 2**31 >= 2**62:
            raise OverflowError("softmax slice too long")
        r[idx] = [(ei * 2**31 + total) // (2 * total) for ei in e]
    out = sat(requant(r, 2.0**-30 / _scale64(s_o)), out_dtype)
    return np.moveaxis(out, -1, dim)


# ----------------------------------------------------------------------------- §16


def _layer_norm_y(group: list[int], E: int, G: int) -> list[int]:
    """c / sqrt(D / 2**G) in Q24 with the integer rsqrt of §16, on Python ints."""
    n = len(group)
    s1 = sum(group)
    s2 = sum(v * v for v in group)
    D = (n * s2 - s1 * s1) * 2**G + E
    assert D < 2**63
    if D == 0:
        return [0] * n
    k = (D.bit_length() - 31) // 2
    Dp = D // 4**k if k >= 0 else D * 4 ** (-k)
    assert 2**30 <= Dp < 2**32
    sq = math.isqrt(Dp * 2**16)
    out = []
    for v in group:
        num = (n * v - s1) * 2 ** (32 + G // 2 - k)
        out.append((2 * num + sq) // (2 * sq))
    return out


def layer_norm(
    q: ArrayLike,
    s_in: Scale,
    in_dtype: str,
    n_dims: int | None,
    weight: ArrayLike | None,
    bias: ArrayLike | None,
    eps: float,
    s_o: Scale,
    out_dtype: str,
    channels_first: bool = False,
) -> np.ndarray:
    """LayerNorm over the last n_dims dims, or over axis 1 (channels_first) (§16).

    weight/bias: shaped like the normalised dims (channels_first: one per channel)."""
    q = _int64(q)
    if channels_first:
        moved = np.moveaxis(q, 1, -1)
        nd = 1
    else:
        moved, nd = q, int(n_dims)  # type: ignore[arg-type]
    norm = moved.shape[moved.ndim - nd :]
    n = int(np.prod(norm, dtype=np.int64))
    A = -_range(in_dtype)[0]
    if n > 2**16 or n * n * A * A > 2**62:
        raise OverflowError("layer norm group too large for int64")
    G = max(g for g in range(0, 17, 2) if n * n * A * A * 2**g <= 2**62)
    E = _rhe_int(float(eps) * n * n / _scale64(s_in) / _scale64(s_in) * 2.0**G)
    s_i = _scale64(s_o) / 256
    w = np.ones(n) if weight is None else np.asarray(weight, np.float32).astype(np.float64)
    b = np.zeros(n) if bias is None else np.asarray(bias, np.float32).astype(np.float64)
    w, b = np.broadcast_to(w.reshape(-1), (n,)), np.broadcast_to(b.reshape(-1), (n,))
    flat = moved.reshape(-1, n)
    out = np.empty(flat.shape, dtype=np.int64)
    for r in range(flat.shape[0]):
        y = _layer_norm_y([int(v) for v in flat[r]], E, G)
        for j in range(n):
            a_i = int(requant(np.array([y[j]]), w[j] / 2.0**24 / s_i)[0])
            b_i = _rhe_int(b[j] / s_i)
            out[r, j] = int(requant(np.array([a_i + b_i]), s_i / _scale64(s_o))[0])
    out = sat(out.reshape(moved.shape), out_dtype)
    return np.moveaxis(out, -1, 1) if channels_first else out


# ----------------------------------------------------------------------------- §17


def _divisors(size: int, k: int, s: int, p: int, ceil_mode: bool, include_pad: bool
              ) -> list[int]:
    out = _pool_out_size(size, k, s, p, 1, ceil_mode)
    ds = []
    for i in range(out):
        start = i * s - p
        end = min(start + k, size + p)
        ds.append(end - start if include_pad else min(end, size) - max(start, 0))
    return ds


def avg_pool2d_divisor(
    q: ArrayLike,
    s_in: Scale,
    kernel: Pair,
    stride: Pair | None,
    padding: Pair,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
    s_o: Scale,
    out_dtype: str,
) -> np.ndarray:
    """Window sums over valid positions, one divisor per output position (§17)."""
    x = _int64(q)
    kh, kw = _pair(kernel)
    sh, sw = _pair(kernel if stride is None else stride)
    ph, pw = _pair(padding)
    N, C, H, W = x.shape
    dh = _divisors(H, kh, sh, ph, ceil_mode, count_include_pad)
    dw = _divisors(W, kw, sw, pw, ceil_mode, count_include_pad)
    out = np.empty((N, C, len(dh), len(dw)), dtype=np.int64)
    for i in range(len(dh)):
        rows = [r for r in range(i * sh - ph, i * sh - ph + kh) if 0 <= r < H]
        for j in range(len(dw)):
            cols = [c for c in range(j * sw - pw, j * sw - pw + kw) if 0 <= c < W]
            acc = x[:, :, rows][:, :, :, cols].sum(axis=(2, 3), dtype=np.int64)
            d = divisor_override if divisor_override is not None else dh[i] * dw[j]
            M = _scale64(s_in) / float(d) / _scale64(s_o)
            out[:, :, i, j] = requant(acc, M)
    return sat(out, out_dtype)


# ----------------------------------------------------------------------------- §19 float16
# NumPy's float64 -> float16 cast rounds once, to nearest even (numpy's npy_double_to_half);
# float16 -> float64 is exact. Everything below is written from §19 alone.

F16_MAX = 65504.0
F16_MAX_REDUCE = 8191


def f16(x: ArrayLike) -> np.ndarray:
    """The float64 value(s) ``x`` rounded once to float16; a result beyond the float16 range
    (inf) or NaN is refused (§19), never saturated."""
    with np.errstate(over="ignore", invalid="ignore"):
        y = np.asarray(x, dtype=np.float64).astype(np.float16)
    if not np.isfinite(y).all():
        raise Refused("a float16 result beyond the float16 range")
    return y


def _f64(x16: ArrayLike) -> np.ndarray:
    x = np.asarray(x16)
    assert x.dtype == np.float16, x.dtype
    return x.astype(np.float64)


def dequantize_f16(q: ArrayLike, s: Scale | ArrayLike, axis: int | None = None) -> np.ndarray:
    """int -> float16 (§19): q * s in float64, rounded once to float16."""
    q64 = _int64(q).astype(np.float64)
    if axis is None or np.ndim(s) == 0:
        return f16(q64 * _scale64(s))
    shape = [1] * q64.ndim
    shape[axis] = -1
    return f16(q64 * _scales64(s).reshape(shape))


def quantize_f16(x16: ArrayLike, s: Scale, dtype: str) -> np.ndarray:
    """float16 -> int (§19): the float16 value is exact in float32; then §3's quantization."""
    return quantize(_f64(x16).astype(np.float32), s, dtype)


def f16_const(c: float) -> np.float64:
    """A scalar operand of a float16 op: held as float16 (rounded once)."""
    return np.float64(f16(np.float64(c)))


def f16_binary(op: str, a16: ArrayLike, b16: ArrayLike) -> np.ndarray:
    """add, sub, mul, maximum, minimum of float16 operands: exact in float64, rounded once."""
    a, b = _f64(a16), _f64(b16)
    exact = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum,
             "minimum": np.minimum}[op](a, b)
    return f16(exact)


def f16_reduce(op: str, a16: ArrayLike, dim: int | Sequence[int] | None,
               keepdim: bool = False) -> np.ndarray:
    """sum / mean over ``dim``: the exact float64 sum (at most 8191 float16 values), divided by
    the count in float64 (mean), rounded once to float16."""
    a = _f64(a16)
    s = a.sum(axis=_axes(dim), keepdims=keepdim)
    n = a.size // max(np.size(s), 1)
    if n > F16_MAX_REDUCE:
        raise Refused("a float16 reduction over more than 8191 values")
    return f16(s if op == "sum" else s / n)


def f16_avg_pool2d(x16: ArrayLike, k: Pair, s: Pair | None = None, p: Pair = 0) -> np.ndarray:
    """AvgPool2d (count_include_pad) in float16: the exact window sum / (kh * kw), one
    rounding."""
    x = _f64(x16)
    kh, kw = _pair(k)
    sh, sw = _pair(s if s is not None else k)
    ph, pw = _pair(p)
    xp = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(ph, ph), (pw, pw)])
    Ho = (x.shape[-2] + 2 * ph - kh) // sh + 1
    Wo = (x.shape[-1] + 2 * pw - kw) // sw + 1
    out = np.zeros((*x.shape[:-2], Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            out[..., i, j] = xp[..., i * sh:i * sh + kh, j * sw:j * sw + kw].sum(axis=(-2, -1))
    return f16(out / (kh * kw))


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


F16_UNARY = {
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "hardswish": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "hardsigmoid": lambda x: np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                                    * (x + 0.044715 * x**3))),
    "relu6": lambda x: np.clip(x, 0.0, 6.0),
}


def f16_unary(kind: str, x16: ArrayLike) -> np.ndarray:
    """An elementwise function of float16 inputs: evaluated in float64, rounded once."""
    with np.errstate(over="ignore"):
        return f16(F16_UNARY[kind](_f64(x16)))


def f16_leaky_relu(x16: ArrayLike, slope: ArrayLike, axis: int = 1) -> np.ndarray:
    """x for x >= 0, else slope * x with the slope held in float16 (per channel along ``axis``
    for PReLU): a product of two float16 values, exact in float64, rounded once."""
    x = _f64(x16)
    a = f16(np.asarray(slope, dtype=np.float64)).astype(np.float64)
    if a.ndim == 1 and a.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        a = a.reshape(shape)
    return f16(np.where(x >= 0, x, a * x))


def f16_softmax(x16: ArrayLike, dim: int) -> np.ndarray:
    """exp(x - max) / sum exp(x - max) along ``dim`` in float64, rounded once."""
    x = _f64(x16)
    e = np.exp(x - x.max(axis=dim, keepdims=True))
    return f16(e / e.sum(axis=dim, keepdims=True))


def f16_layer_norm(x16: ArrayLike, n_dims: int, weight: ArrayLike | None,
                   bias: ArrayLike | None, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * w + b over the last ``n_dims`` in float64 (biased
    variance), float32 weight and bias exact in float64, rounded once."""
    x = _f64(x16)
    axes = tuple(range(x.ndim - n_dims, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float32).astype(np.float64)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32).astype(np.float64)
    return f16(y)


def gemm_f16(acc: ArrayLike, s_acc: ArrayLike, channel_axis: int,
             activation: str | None = None) -> np.ndarray:
    """A conv/linear with float16 output (§19): its int32 accumulator (bias included, §5's
    accumulator output) times the accumulator scale in float64, rounded once; then ReLU or
    ReLU6 on the float16 values."""
    a = _int64(acc).astype(np.float64)
    shape = [1] * a.ndim
    shape[channel_axis] = -1
    y = f16(a * _scales64(s_acc).reshape(shape))
    if activation == "relu":
        y = np.maximum(y, np.float16(0))
    elif activation == "relu6":
        y = np.clip(y, np.float16(0), np.float16(6))
    return y
