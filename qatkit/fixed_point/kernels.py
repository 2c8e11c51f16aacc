"""Integer kernels of the fixed-point model, exactly as ``docs/fixed-point.md`` specifies.

All functions take and return integer tensors; the only floats are scales and the real
multipliers made from them. Speed comes from choosing, per layer, an arithmetic that is
*provably* exact (section 12 of the spec):

* int8 im2col + ``torch._int_mm`` (int32 accumulation) for int8 inputs and ungrouped convs,
* float32 convolution when a static bound shows every partial sum stays below 2^24 (grouped
  and depthwise convs, int16 inputs with small kernels),
* float64 convolution (exact below 2^53) otherwise, and for transposed convs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qatkit.base.errors import fail
from qatkit.base.quant_math import along, qrange

F32_EXACT = 2**24


def multiplier(M: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode real multipliers ``M`` (float64) as ``m * 2^-n`` with ``2^14 <= |m| < 2^15``."""
    M = torch.as_tensor(M, dtype=torch.float64)
    f, e = torch.frexp(M)
    m = torch.round(f * 2.0**15).to(torch.int64)
    n = 15 - e.to(torch.int64)
    full = m.abs() == 2**15
    m = torch.where(full, m // 2, m)
    n = torch.where(full, n - 1, n)
    n = torch.where(m == 0, torch.zeros_like(n), n)
    return m, n


def requant(v: torch.Tensor, M: torch.Tensor | float, axis: int | None = None) -> torch.Tensor:
    """``floor(v * m / 2^n + 1/2)`` in int64 (section 4); no saturation."""
    return requant_mn(v, *multiplier(M), axis=axis)


def requant_mn(v: torch.Tensor, m: torch.Tensor, n: torch.Tensor, axis: int | None = None
               ) -> torch.Tensor:
    """:func:`requant` with the multiplier already encoded by :func:`multiplier`."""
    m, n = along(m, axis, v.dim()), along(n, axis, v.dim())
    v = v.to(torch.int64) * m
    if n.dim() == 0 and v.dim() > 0:  # common per-tensor case: plain Python shifts
        ni = int(n)
        if ni >= 1:
            ni = min(ni, 63)  # |v*m| < 2^62, so any n >= 63 gives 0 exactly as 63 does
            return (v + (1 << (ni - 1))) >> ni
        return v << -ni
    right = n.clamp(0, 63)
    rnd = torch.where(right >= 1, torch.ones_like(right) << (right - 1).clamp_min(0), 0)
    return ((v + rnd) >> right) << (-n).clamp_min(0)


def requant_plan(m: torch.Tensor, n: torch.Tensor, q_b: torch.Tensor, acc_bound: int
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Float64 form of ``requant(acc + q_b, m, n)``: ``floor(acc * mult + addend)`` with
    ``mult = m * 2^-n`` and ``addend = q_b * mult + 1/2``. Every intermediate is an integer
    multiple of ``2^-n`` below ``2^53 * 2^-n``, hence exact, when ``|acc + q_b| * 2^15 < 2^52``
    and ``n <= 52``; returns None when that cannot be proven."""
    if (acc_bound + int(q_b.abs().max())) * 2**15 >= 2**52 or int(n.max()) > 52:
        return None
    mult = m.to(torch.float64) * torch.exp2(-n.to(torch.float64))
    return mult, q_b.to(torch.float64) * mult + 0.5


def requant_f64(acc: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int,
                dtype: str, axis: int) -> torch.Tensor:
    """Apply a :func:`requant_plan`, clamp to ``[lo, hi]`` and cast to ``dtype``."""
    from qatkit.base.quant_math import TORCH_DTYPE
    mult, addend = (along(t, axis, acc.dim()) for t in plan)
    out_dtype = TORCH_DTYPE[dtype]
    per_sample = acc.numel() // max(acc.shape[0], 1) if acc.dim() else 1
    if acc.dim() < 2 or axis == 0 or acc.numel() <= REQUANT_CHUNK:
        return _requant_f64_block(acc, mult, addend, lo, hi, out_dtype)
    # a float64 scratch of the whole output would be the largest tensor of the forward: work
    # through the batch in slices (each sample is requantized independently)
    out = torch.empty_like(acc, dtype=out_dtype)
    step = max(1, REQUANT_CHUNK // per_sample)
    for i in range(0, acc.shape[0], step):
        out[i:i + step] = _requant_f64_block(acc[i:i + step], mult, addend, lo, hi, out_dtype)
    return out


REQUANT_CHUNK = 1 << 20  # elements of float64 scratch (8 MiB) per requantization step


def _requant_f64_block(acc: torch.Tensor, mult: torch.Tensor, addend: torch.Tensor, lo: int,
                       hi: int, out_dtype: torch.dtype) -> torch.Tensor:
    # one float64 buffer, updated in place: acc * mult and the sum with addend are exact (see
    # requant_plan), so the order and rounding of these steps cannot change a bit
    t = acc.to(torch.float64, copy=True)
    t.mul_(mult).add_(addend)
    return t.floor_().clamp_(lo, hi).to(out_dtype)


def requant_float(v: torch.Tensor, M: torch.Tensor | float, axis: int | None = None
                  ) -> torch.Tensor:
    """:func:`requant` of an int8/int16/int32 tensor as an integer-valued float64 tensor.
    ``floor(v * (m * 2^-n) + 1/2)`` is exact in float64 when ``n <= 52``: ``|v * m| < 2^46``,
    and every intermediate is a multiple of ``2^-n`` with at most 53 significant bits. (float64
    because CPUs without AVX-512 have no vectorised int64 multiply.)"""
    m, n = multiplier(M)
    if int(n.max()) > 52:  # a tiny multiplier: the int64 rule as written
        return requant_mn(v, m, n, axis).to(torch.float64)
    mult = along(m.to(torch.float64) * torch.exp2(-n.to(torch.float64)), axis, v.dim())
    t = v.to(torch.float64, copy=True)
    return t.mul_(mult).add_(0.5).floor_()


def saturate(v: torch.Tensor, dtype: str) -> torch.Tensor:
    from qatkit.base.quant_math import TORCH_DTYPE
    qmin, qmax = qrange(dtype)
    return v.clamp(qmin, qmax).to(TORCH_DTYPE[dtype])


def real_multiplier(*scales: torch.Tensor | float, divide_by: torch.Tensor | float
                    ) -> torch.Tensor:
    """``s1 * s2 * ... / s_o`` evaluated left to right in float64 from float32 scales."""
    out = torch.as_tensor(scales[0], dtype=torch.float32).to(torch.float64)
    for s in scales[1:]:
        out = out * torch.as_tensor(s, dtype=torch.float32).to(torch.float64)
    return out / torch.as_tensor(divide_by, dtype=torch.float32).to(torch.float64)


def quantize_weight(w: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    return torch.round(w.to(torch.float32) / along(s_w, 0, w.dim())).clamp_(-128, 127).to(
        torch.int8)


def quantize_bias(b: torch.Tensor, s_in: torch.Tensor, s_w: torch.Tensor, who: str = "a layer"
                  ) -> torch.Tensor:
    """``round_half_even(b / (s_in * s_w))`` (section 5). A bias int32 cannot hold at that
    scale is refused (QK105), never clipped: clipping would change the channel's output."""
    acc_scale = s_in.to(torch.float32).to(torch.float64) * s_w.to(torch.float64)
    q = torch.round(b.to(torch.float32).to(torch.float64) / acc_scale)
    lo, hi = qrange("qint32")
    bad = ~((q >= lo) & (q <= hi))  # NaN counts as bad
    if bool(bad.any()):
        c = int(bad.nonzero()[0, 0])
        raise fail("QK105", f"{who}: the bias {float(b[c]):.6g} of output channel {c} is "
                   f"{float(q[c]):.4g} at the accumulator scale s_in * s_w = "
                   f"{float(acc_scale[c]):.4g}, beyond int32 [{lo}, {hi}]; the fixed-point "
                   "model cannot hold it and clipping would change the channel's output.",
                   "the channel's weights are tiny next to its bias: prune the channel (all-zero "
                   "weights get a scale from the bias), clip or regularise the bias in training, "
                   "or use a larger input scale")
    return q.to(torch.int64)


def check_int32(acc: torch.Tensor, who: str) -> None:
    """Refuse (QK105) an int32 output (high-precision or accumulator, section 5) whose exact
    value int32 cannot hold: saturating it would be silently wrong."""
    lo, hi = qrange("qint32")
    if not acc.numel():
        return
    amin, amax = int(acc.min()), int(acc.max())
    if amin < lo or amax > hi:
        raise fail("QK105", f"{who}: its int32 output (high-precision or accumulator) needs "
                   f"{amin if amin < lo else amax}, beyond int32 [{lo}, {hi}]; the fixed-point "
                   "model would saturate it.",
                   "give the layer a quantized output (drop high_precision_output), use int8 "
                   "inputs for it, or reduce the input range")


def accumulator_scale(s_in: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    return (s_in.to(torch.float64) * s_w.to(torch.float64)).to(torch.float32)


def input_bound(dtype: str) -> int:
    return -qrange(dtype)[0]


def acc_bound(q_w: torch.Tensor, in_dtype: str) -> int:
    """Largest possible ``|sum(q_in * q_w[c])|`` over channels and inputs of ``in_dtype``."""
    return input_bound(in_dtype) * int(q_w.to(torch.int64).abs().flatten(1).sum(1).max())


INT32_EXACT = 2**31


def conv_method(q_w: torch.Tensor, in_dtype: str, groups: int) -> str:
    """Pick an exact arithmetic for a conv from a static bound of its partial sums."""
    bound = acc_bound(q_w, in_dtype)
    if in_dtype == "qint8" and groups == 1 and bound < INT32_EXACT:
        # exact (the int32 sums cannot overflow: always so below 131072 taps), and faster than
        # float32 convolution on CPU
        return "int_mm"
    if bound < F32_EXACT:
        return "float32"
    return "float64"


def conv2d(q: torch.Tensor, q_w: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], groups: int, method: str,
           w_cols: torch.Tensor | None = None) -> torch.Tensor:
    """Exact integer convolution sum (no bias): int32 for int_mm, otherwise a float tensor
    holding integers. ``w_cols``: the weights prepared for ``method`` (see
    :func:`prepared_weight`), to skip preparing them on every call."""
    if method == "int_mm":
        return _conv2d_int_mm(q, q_w, stride, padding, dilation, w_cols)
    ft = FLOAT_METHODS[method]
    w = w_cols if w_cols is not None else q_w.to(ft)
    return F.conv2d(q.to(ft), w, None, stride, padding, dilation, groups)


FLOAT_METHODS = {"float32": torch.float32, "float64": torch.float64}


def prepared_weight(q_w: torch.Tensor, method: str) -> torch.Tensor:
    return weight_columns(q_w) if method == "int_mm" else q_w.to(FLOAT_METHODS[method])


def canonical(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides. torch._int_mm on CPU reads operands wrongly when their
    strides are unusual even though ``is_contiguous()`` holds (a size-1 dimension with any
    stride, or an overlapping im2col view), so its operands are normalised first."""
    want, acc = [], 1
    for size in reversed(t.shape):
        want.append(acc)
        acc *= size
    if t.stride() == tuple(reversed(want)):
        return t
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def weight_columns(q_w: torch.Tensor) -> torch.Tensor:
    """int8 weights [O, C, kh, kw] as the [kh*kw*C, O] matrix of the NHWC im2col."""
    return canonical(q_w.permute(2, 3, 1, 0).reshape(-1, q_w.shape[0]))


def _conv2d_int_mm(q: torch.Tensor, q_w: torch.Tensor, stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int],
                   w_cols: torch.Tensor | None) -> torch.Tensor:
    n, c = q.shape[:2]
    o, _, kh, kw = q_w.shape
    x = q.to(torch.int8).permute(0, 2, 3, 1)  # NHWC view
    if padding[0] or padding[1]:
        x = F.pad(x, (0, 0, padding[1], padding[1], padding[0], padding[0]))
    hp, wp = x.shape[1], x.shape[2]
    ho = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    sn, sh, sw, sc = x.stride()
    cols = x.as_strided((n, ho, wo, kh, kw, c),
                        (sn, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1],
                         sc))
    a = canonical(cols.reshape(n * ho * wo, kh * kw * c))
    if w_cols is None:
        w_cols = weight_columns(q_w)
    acc = torch._int_mm(a, w_cols)  # int32, exact
    return acc.view(n, ho, wo, o).permute(0, 3, 1, 2)


def linear(q: torch.Tensor, q_w_t: torch.Tensor, method: str) -> torch.Tensor:
    """Exact ``q @ q_w.T`` for inputs [..., K]; ``q_w_t`` is the [K, O] weight matrix."""
    lead = q.shape[:-1]
    a = q.reshape(-1, q.shape[-1])
    if method == "int_mm":
        acc = torch._int_mm(canonical(a.to(torch.int8)), canonical(q_w_t))
    else:
        ft = torch.float32 if method == "float32" else torch.float64
        acc = (a.to(ft) @ q_w_t.to(ft)).to(torch.int64)
    return acc.reshape(*lead, q_w_t.shape[1])


def conv_transpose2d(q: torch.Tensor, q_w: torch.Tensor, stride: tuple[int, int],
                     padding: tuple[int, int], output_padding: tuple[int, int], groups: int,
                     dilation: tuple[int, int]) -> torch.Tensor:
    out = F.conv_transpose2d(q.to(torch.float64), q_w.to(torch.float64), None, stride, padding,
                             output_padding, groups, dilation)
    return out.to(torch.int64)


def lut_table(fn_name: str, s_in: torch.Tensor, in_dtype: str, s_o: torch.Tensor,
              out_dtype: str) -> torch.Tensor:
    """The lookup table of section 10, indexed by ``q - qmin``."""
    qmin, qmax = qrange(in_dtype)
    x = torch.arange(qmin, qmax + 1, dtype=torch.float64) * float(s_in)
    y = LUT_FUNCS[fn_name](x)
    return saturate(torch.round(y / float(s_o)).to(torch.int64), out_dtype)


LUT_FUNCS = {
    "sigmoid": lambda x: 1.0 / (1.0 + torch.exp(-x)),
    "tanh": torch.tanh,
    "silu": lambda x: x / (1.0 + torch.exp(-x)),
    "hardswish": lambda x: x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0,
    "hardsigmoid": lambda x: torch.clamp(x + 3.0, 0.0, 6.0) / 6.0,
}


def bilinear_taps(in_size: int, out_size: int, align_corners: bool,
                  scale_factor: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices i0, i1 and the Q8 weight of i1 along one axis (section 9).
    ``scale_factor``: the factor PyTorch was given (and not asked to recompute). Without
    ``align_corners`` PyTorch then maps ``dst`` back with ``1 / scale_factor``, not
    ``in_size / out_size`` (they differ when ``in_size * scale_factor`` is not an integer),
    except along an axis whose size does not change, which it copies."""
    d = torch.arange(out_size, dtype=torch.float64)
    if align_corners:
        src = d * ((in_size - 1) / (out_size - 1)) if out_size > 1 else torch.zeros_like(d)
    else:
        scale = (1.0 / scale_factor if scale_factor and out_size != in_size
                 else in_size / out_size)
        src = ((d + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = torch.floor(src).to(torch.int64).clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    w1 = torch.round((src - i0.to(torch.float64)) * 256).to(torch.int64)
    return i0, i1, w1
