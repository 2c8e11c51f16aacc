"""Integer kernels of the fixed-point model, exactly as ``docs/fixed-point.md`` specifies.

All functions take and return integer tensors; the only floats are scales and the real
multipliers made from them. Speed comes from choosing, per layer, an arithmetic that is
*provably* exact (section 12 of the spec):

* int8 im2col + ``torch._int_mm`` (int32 accumulation) for int8 inputs and ungrouped convs,
  where this machine's ``_int_mm`` is the faster engine (:mod:`qatkit.fixed_point.gemm`),
* float32 convolution when a static bound shows every partial sum stays below 2^24 (grouped
  and depthwise convs, int16 inputs with small kernels, and int8 layers where float32 GEMM is
  the faster engine),
* float64 convolution (exact below 2^53) otherwise, and for transposed convs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from qatkit.base.errors import fail
from qatkit.base.quant_math import along, qrange
from qatkit.fixed_point import epilogue, gemm

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
    """``floor(v * m / 2^n + 1/2)`` in int64 (section 4); no saturation. A per-tensor ``M``
    that is a power of two (power-of-two scales) takes the shift form of section 18."""
    k = pow2_shift(M)
    if k is not None:
        return requant_shift(v, k)
    return requant_mn(v, *multiplier(M), axis=axis)


def pow2_shift(M: torch.Tensor | float) -> int | None:
    """``k`` when the one multiplier ``M`` is exactly ``2^-k`` (else None)."""
    if isinstance(M, torch.Tensor):
        if M.numel() != 1:
            return None
        M = float(M)
    f, e = math.frexp(float(M))
    return 1 - e if f == 0.5 else None


def requant_shift(v: torch.Tensor, k: int) -> torch.Tensor:
    """section 4 for ``M = 2^-k`` (``m = 2^14``, ``n = k + 14``): ``(v + 2^(k-1)) >> k`` for
    ``k >= 1``, ``v * 2^-k`` for ``k <= 0``, in int64 (section 18)."""
    v = v.to(torch.int64)
    if k >= 1:
        k = min(k, 62)  # |v| < 2^47: any k >= 48 gives 0, as 62 does
        return (v + (1 << (k - 1))) >> k
    return v << -k


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


def requant_py(v: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """:func:`requant_mn` for one per-tensor multiplier given as Python ints (the same
    integers; no tensor is turned into a number, so ``torch.export`` can trace it)."""
    v = v.to(torch.int64) * m
    if n >= 1:
        n = min(n, 63)  # |v*m| < 2^62, so any n >= 63 gives 0 exactly as 63 does
        return (v + (1 << (n - 1))) >> n
    return v << -n


def float_plan(M: torch.Tensor | float) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The constants of :func:`requant_float`: ``(m * 2^-n or None, m, n)``."""
    m, n = multiplier(M)
    if int(n.max()) > 52:  # a tiny multiplier: the int64 rule as written
        return None, m, n
    return m.to(torch.float64) * torch.exp2(-n.to(torch.float64)), m, n


def requant_float_plan(v: torch.Tensor, plan: tuple[torch.Tensor | None, torch.Tensor,
                                                       torch.Tensor], axis: int | None = None
                       ) -> torch.Tensor:
    """:func:`requant_float` with its constants from :func:`float_plan`."""
    mult, m, n = plan
    if mult is None:
        return requant_mn(v, m, n, axis).to(torch.float64)
    t = v.to(torch.float64, copy=True)
    return t.mul_(along(mult.to(v.device), axis, v.dim())).add_(0.5).floor_()


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


def float_multiplier(M: torch.Tensor | float) -> torch.Tensor | None:
    """``m * 2^-n`` (float64, exact) of the encoding of ``M``, or None when ``n > 52`` (then
    the float64 form of :func:`requant_float` is not proven exact)."""
    return float_plan(M)[0]


def requant_float(v: torch.Tensor, M: torch.Tensor | float, axis: int | None = None
                  ) -> torch.Tensor:
    """:func:`requant` of an int8/int16/int32 tensor as an integer-valued float64 tensor.
    ``floor(v * (m * 2^-n) + 1/2)`` is exact in float64 when ``n <= 52``: ``|v * m| < 2^46``,
    and every intermediate is a multiple of ``2^-n`` with at most 53 significant bits. (float64
    because CPUs without AVX-512 have no vectorised int64 multiply.)"""
    return requant_float_plan(v, float_plan(M), axis)


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


def quantize_weight(w: torch.Tensor, s_w: torch.Tensor, dtype: str = "qint8") -> torch.Tensor:
    """``sat_T(round_half_even(float32(w) / s_w[c]))`` per output channel, ``T`` qint8 or qint16
    (section 5)."""
    from qatkit.base.quant_math import TORCH_DTYPE
    return torch.round(w.to(torch.float32) / along(s_w, 0, w.dim())).clamp_(
        *qrange(dtype)).to(TORCH_DTYPE[dtype])


def bias_integers(b: torch.Tensor, s_in: torch.Tensor, s_w: torch.Tensor, who: str = "a layer"
                  ) -> torch.Tensor:
    """``round_half_even(b / (s_in * s_w))`` (section 5) as float64 integers, of any size:
    beyond 2^52 the float64 quotient is itself an integer, so the value is exact. A bias that is
    not finite at that scale (NaN, or an overflow) is refused (QK105)."""
    acc_scale = s_in.to(torch.float32).to(torch.float64) * s_w.to(torch.float64)
    q = torch.round(b.to(torch.float32).to(torch.float64) / acc_scale)
    bad = ~torch.isfinite(q)
    if bool(bad.any()):
        c = int(bad.nonzero()[0, 0])
        raise fail("QK105", f"{who}: the bias {float(b[c]):.6g} of output channel {c} is not a "
                   f"finite number at the accumulator scale s_in * s_w = "
                   f"{float(acc_scale[c]):.4g}.", "give the layer a finite bias")
    return q


def fits_int32(q_b: torch.Tensor) -> bool:
    lo, hi = qrange("qint32")
    return bool(((q_b >= lo) & (q_b <= hi)).all())


def quantize_bias(b: torch.Tensor, s_in: torch.Tensor, s_w: torch.Tensor, who: str = "a layer"
                  ) -> torch.Tensor:
    """The int32 bias ``round_half_even(b / (s_in * s_w))`` (section 5), refused (QK105) where
    int32 cannot hold it, never clipped. (A conv/linear holds such a bias exactly in its
    requantization instead: :func:`wide_plan`.)"""
    q = bias_integers(b, s_in, s_w, who)
    if not fits_int32(q):
        lo, hi = qrange("qint32")
        c = int((~((q >= lo) & (q <= hi))).nonzero()[0, 0])
        raise fail("QK105", f"{who}: the bias {float(b[c]):.6g} of output channel {c} is "
                   f"{float(q[c]):.4g} at the accumulator scale, beyond int32 [{lo}, {hi}].",
                   "use the layer's own fixed-point form, which holds it exactly")
    return q.to(torch.int64)


def channel_bounds(q_w: torch.Tensor, in_dtype: str) -> torch.Tensor:
    """Per output channel, the largest possible ``|sum(q_in * q_w[c])|`` (int64)."""
    return input_bound(in_dtype) * q_w.to(torch.int64).abs().flatten(1).sum(1)


def wide_plan(q_b: torch.Tensor, m: torch.Tensor, n: torch.Tensor, bounds: torch.Tensor,
              who: str) -> dict[str, torch.Tensor]:
    """The constants of :func:`requant_wide`, exactly ``requant(acc + q_b, m, n)`` (section 5,
    "A bias beyond int32") for an ``acc`` within ``bounds`` and any integer ``q_b``.

    Per channel, with ``q_b * m + 2^(n-1) = H * 2^n + L`` (``0 <= L < 2^n``, Python ints)::

        floor(((acc + q_b) * m + 2^(n-1)) / 2^n) = H + floor((acc * m + L) / 2^n)

    ``H`` is the bias at the output scale and ``L`` the rounding addend that replaces
    ``2^(n-1)``; ``H`` is clamped to ``+-2^61`` (exact: such an output saturates either way).
    With ``t = acc * m`` (``|t| < 2^62``): for ``n <= 62`` the last term is ``(t + L) >> n``;
    for ``n >= 63`` it is ``-1``, ``0`` or ``1``, namely ``bump + ((t + A) >> 63)`` with ``A = L,
    bump = 0`` when ``L < 2^62``, ``A = L - 2^n, bump = 1`` when ``L >= 2^n - 2^62``, and
    ``A = 2^62 - 1, bump = 0`` (always 0) between. ``n <= 0`` (``M >= 2^14``): ``H = q_b * m *
    2^-n`` and the term is ``t << -n``, refused (QK105) where ``bound * |M|`` could reach 2^60."""
    rows: list[tuple[int, ...]] = []
    for c in range(q_b.numel()):
        qb, mi, ni, bound = int(q_b[c]), int(m[c]), int(n[c]), int(bounds[c])
        if ni <= 0:
            if (bound * abs(mi)) << -ni >= 2**60:
                raise fail("QK105", f"{who}: output channel {c} has a bias beyond int32 at "
                           f"the accumulator scale and a multiplier {mi} * 2^{-ni} so large "
                           "that its sum could leave int64.",
                           "check the layer's scales (input, weight and output scale)")
            rows.append((qb * mi << -ni, 0, 0, 0, -ni))
            continue
        big = qb * mi + (1 << (ni - 1))
        h, low = big >> ni, big & ((1 << ni) - 1)
        if ni <= 62:
            rows.append((h, low, 0, ni, 0))
        elif low < 2**62:
            rows.append((h, low, 0, 63, 0))
        elif low >= (1 << ni) - 2**62:
            rows.append((h, low - (1 << ni), 1, 63, 0))
        else:
            rows.append((h, 2**62 - 1, 0, 63, 0))
    cap = 2**61
    cols = list(zip(*rows)) if rows else [()] * 5
    dev = q_b.device
    plan = {k: torch.tensor(v, dtype=torch.int64, device=dev)
            for k, v in zip(("H", "A", "bump", "right", "left"),
                            ([max(-cap, min(cap, v)) for v in cols[0]], *cols[1:]))}
    plan["m"] = m.to(torch.int64).to(dev)
    return plan


def requant_wide(acc: torch.Tensor, plan: dict[str, torch.Tensor], axis: int) -> torch.Tensor:
    """``requant(acc + q_b, m, n)`` per channel along ``axis`` from :func:`wide_plan` (int64,
    exact): ``t = acc * m`` is below 2^62 (``|acc| < 2^47``, section 5) and ``|A| < 2^62``, so
    no step overflows."""
    p = {k: along(v, axis, acc.dim()) for k, v in plan.items()}
    t = acc.to(torch.int64) * p["m"]
    return ((p["bump"] + ((t + p["A"]) >> p["right"])) << p["left"]) + p["H"]


def int32_shifts(q_b: torch.Tensor) -> torch.Tensor:
    """Per channel, the right shift ``k`` of an int32 (high-precision or accumulator) output
    whose bias int32 cannot hold (section 5): ``bitlen(|q_b|) - 29``, so the bias is below
    2^29 output units and an int8 layer's sum (below 2^31 before the shift, k >= 3) too:
    the output fits int32; 0 for a bias that fits."""
    lo, hi = qrange("qint32")
    out = [0 if lo <= int(q) <= hi else abs(int(q)).bit_length() - 29 for q in q_b.tolist()]
    return torch.tensor(out, dtype=torch.int64, device=q_b.device)


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
ACC_LIMIT = 2**47  # |acc| below this: requant's int64 product v * m cannot overflow (section 4)


def check_accumulator(q_w: torch.Tensor, in_dtype: str, who: str = "conv/linear") -> int:
    """The static bound of :func:`acc_bound`, refused (QK106) when it reaches 2^47: section 4's
    int64 requantization (and float64 sums) are exact only below it. int16 x int16 reaches it
    past 2^17 taps of full-range weights; int8 weights never do."""
    bound = acc_bound(q_w, in_dtype)
    if bound >= ACC_LIMIT:
        from qatkit.base.errors import fail
        raise fail("QK106", f"{who}: {in_dtype} inputs times its {str(q_w.dtype)[6:]} weights "
                   f"can sum to {bound} (>= 2^47), which the exact int64 requantization "
                   "cannot hold.", "use qint8 weights or inputs for this layer, or split it")
    return bound


def transposed_method(q_w: torch.Tensor, in_dtype: str) -> str:
    """Transposed convs always sum in float64, exact below the bound :func:`check_accumulator`
    enforces."""
    check_accumulator(q_w, in_dtype, "ConvTranspose2d")
    return "float64"


def conv_method(q_w: torch.Tensor, in_dtype: str, groups: int) -> str:
    """Pick an exact arithmetic for a conv (or linear) from a static bound of its partial sums
    (int16 weights never take the int8 ``_int_mm`` path). For int8 x int8 layers both
    ``_int_mm`` and float32 (below 2^24) are exact; :func:`gemm.engine` says which is faster
    on the weights' device."""
    bound = check_accumulator(q_w, in_dtype)
    if in_dtype == "qint8" and q_w.dtype == torch.int8 and groups == 1 and bound < INT32_EXACT:
        # exact: the int32 sums cannot overflow (always so below 131072 taps)
        if gemm.engine(q_w.device) == "float32":
            if bound < F32_EXACT:
                return "float32"
            if f32_chunks(q_w, in_dtype) is not None:
                return "float32_split"
        return "int_mm"
    if bound < F32_EXACT:
        return "float32"
    return "float64"


def f32_chunks(q_w: torch.Tensor, in_dtype: str) -> tuple[tuple[int, int], ...] | None:
    """Ranges ``[lo, hi)`` of input channels (of ``q_w`` [O, C, kh, kw]; of K for a linear's
    [O, K]) over which every partial sum of every output channel stays below 2^24, so each
    range sums exactly in float32 (section 12); None when one channel alone reaches 2^24."""
    w = q_w.to(torch.int64).abs()
    per = input_bound(in_dtype) * (w.flatten(2).sum(2) if w.dim() > 2 else w)  # [O, C]
    if not per.numel() or int(per.max()) >= F32_EXACT:
        return None
    chunks, lo, c = [], 0, per.shape[1]
    while lo < c:  # each range ends before its running sum reaches 2^24 in some channel
        over = (per[:, lo:].cumsum(1) >= F32_EXACT).any(0).nonzero()
        hi = lo + int(over[0]) if len(over) else c
        chunks.append((lo, hi))
        lo = hi
    return tuple(chunks)


def _split(q_w: torch.Tensor, chunks: tuple[tuple[int, int], ...] | None
           ) -> tuple[tuple[int, int], ...]:
    """The ``float32_split`` ranges of int8 weights [O, C, ...]: given, or made; refused
    (never an empty sum) where no split exists."""
    chunks = chunks or f32_chunks(q_w, "qint8")
    if chunks is None:
        raise fail("QK106", "float32_split: one input channel alone can sum to 2^24, which "
                   "float32 cannot hold exactly.", "use the int_mm or float64 method")
    return chunks


def conv2d(q: torch.Tensor, q_w: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], groups: int, method: str,
           w_cols: torch.Tensor | None = None,
           chunks: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
    """Exact integer convolution sum (no bias): int32 for int_mm and float32_split, otherwise
    a float tensor holding integers. ``w_cols``: the weights prepared for ``method`` (see
    :func:`prepared_weight`), to skip preparing them on every call; ``chunks``: the input
    channel ranges of ``float32_split`` (:func:`f32_chunks` of the int8 weights)."""
    if method == "int_mm":
        return _conv2d_int_mm(q, q_w, stride, padding, dilation, w_cols)
    ft = FLOAT_METHODS[method]
    w = w_cols if w_cols is not None else q_w.to(ft, memory_format=torch.contiguous_format)
    with no_tf32():
        if method != "float32_split":
            return F.conv2d(q.to(ft), w, None, stride, padding, dilation, groups)
        # each channel range sums exactly in float32; their sum is exact in int32
        x, acc = q.to(ft), None
        for lo, hi in _split(q_w, chunks):
            part = F.conv2d(x[:, lo:hi], w[:, lo:hi], None, stride, padding, dilation)
            acc = part.to(torch.int32) if acc is None else acc.add_(part.to(torch.int32))
        return acc


FLOAT_METHODS = {"float32": torch.float32, "float32_split": torch.float32,
                 "float64": torch.float64}


#: Reduced-precision settings a user may have turned on for float32 work, each one breaking
#: the exactness bounds of section 12 (TF32 keeps 10 mantissa bits, bf16 8):
#: ``torch.set_float32_matmul_precision("medium")`` makes oneDNN's CPU matmuls bf16.
_FP32_PRECISION = (torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """float32 convolutions and matmuls in full IEEE float32 on every backend: TF32 off on
    CUDA (cuDNN's default for convolutions), oneDNN's float32 precision "ieee" (not bf16) on
    CPU, and NNPACK off (its Winograd/FFT convolutions are not exact on integers)."""
    mm = torch.backends.cuda.matmul.allow_tf32
    old = [b.fp32_precision for b in _FP32_PRECISION]
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        for b in _FP32_PRECISION:
            b.fp32_precision = "ieee"
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False), \
                torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = mm
        for b, v in zip(_FP32_PRECISION, old, strict=True):
            b.fp32_precision = v


def int_mm(a: torch.Tensor, b: torch.Tensor, cuda_rules: bool | None = None) -> torch.Tensor:
    """``torch._int_mm`` (int8 x int8 -> int32, exact) under its CUDA shape rules (more than
    16 rows, both other sizes multiples of 8): on CUDA, zero rows/columns pad the operands
    (zeros add nothing to a sum) and the padding is cut off the result. ``cuda_rules``
    forces the padding on or off (default: on for CUDA tensors)."""
    if not (a.device.type == "cuda" if cuda_rules is None else cuda_rules):
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(0, 17 - m), -k % 8, -n % 8
    if pm or pk:
        a = F.pad(a, (0, pk, 0, pm))
    if pk or pn:
        b = F.pad(b, (0, pn, 0, pk))
    out = torch._int_mm(a.contiguous(), b.contiguous())
    return canonical(out[:m, :n]) if pm or pn else out


def prepared_weight(q_w: torch.Tensor, method: str) -> torch.Tensor | None:
    """For ``int_mm`` the column matrix (a view when ``q_w`` is stored as one, see
    :func:`columns_as_weight`); for a float method None: :func:`conv2d` casts the integer
    weights at each call, so a converted model holds its weights once, as integers (a float32
    copy of every layer would cost more memory than the float model; the cast costs about 2 %
    of a resnet18-sized forward at batch 8)."""
    if method == "int_mm":
        return weight_columns(q_w)
    return None


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
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def weight_columns(q_w: torch.Tensor) -> torch.Tensor:
    """int8 weights [O, C, kh, kw] as the [kh*kw*C, O] matrix of the NHWC im2col."""
    return canonical(q_w.permute(2, 3, 1, 0).reshape(-1, q_w.shape[0]))


def columns_as_weight(w_cols: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The [O, C, kh, kw] view of a [kh*kw*C, O] column matrix: :func:`weight_columns` of it
    is ``w_cols`` again, without a copy."""
    o, c, kh, kw = shape
    return w_cols.view(kh, kw, c, o).permute(3, 2, 0, 1)


def _conv2d_int_mm(q: torch.Tensor, q_w: torch.Tensor, stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int],
                   w_cols: torch.Tensor | None) -> torch.Tensor:
    n, c = q.shape[:2]
    o, _, kh, kw = q_w.shape
    x = q.to(torch.int8).permute(0, 2, 3, 1)  # NHWC view
    if w_cols is None:
        w_cols = weight_columns(q_w)
    if kh == kw == 1 and stride == (1, 1) and padding == (0, 0) and x.is_contiguous():
        # a 1x1 conv of an NHWC tensor is a plain matmul: no im2col copy at all
        acc = int_mm(canonical(x.reshape(-1, c)), w_cols)
        return acc.view(n, x.shape[1], x.shape[2], o).permute(0, 3, 1, 2)
    if dilation == (1, 1) and epilogue.use_compiled(x):  # pad + im2col in one pass
        a = canonical(epilogue.im2col(x, (kh, kw), stride, padding, dilation))
        hp, wp = x.shape[1] + 2 * padding[0], x.shape[2] + 2 * padding[1]
        ho = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        return int_mm(a, w_cols).view(n, ho, wo, o).permute(0, 3, 1, 2)
    if padding[0] or padding[1]:
        x = F.pad(x, (0, 0, padding[1], padding[1], padding[0], padding[0]))
    # as_strided reads memory, not values: on a view (the NHWC permute of an NCHW tensor) its
    # strides are the view's, which torch.export does not keep (an exported program computed
    # other integers); an int8 copy is small next to the columns
    x = x.contiguous()
    hp, wp = x.shape[1], x.shape[2]
    ho = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    sn, sh, sw, sc = x.stride()
    cols = x.as_strided((n, ho, wo, kh, kw, c),
                        (sn, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1],
                         sc))
    a = canonical(cols.reshape(n * ho * wo, kh * kw * c))
    acc = int_mm(a, w_cols)  # int32, exact
    return acc.view(n, ho, wo, o).permute(0, 3, 1, 2)


def linear(q: torch.Tensor, q_w_t: torch.Tensor, method: str,
           chunks: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
    """Exact ``q @ q_w.T`` for inputs [..., K]; ``q_w_t`` is the [K, O] weight matrix;
    ``chunks``: the K ranges of ``float32_split``."""
    lead = q.shape[:-1]
    a = q.reshape(-1, q.shape[-1])
    if method == "int_mm":
        acc = int_mm(canonical(a.to(torch.int8)), canonical(q_w_t))
    elif method == "float32_split":  # as conv2d: exact float32 ranges of K, summed in int32
        af, wf = a.to(torch.float32), q_w_t.to(torch.float32)
        acc = torch.zeros(a.shape[0], q_w_t.shape[1], dtype=torch.int32, device=a.device)
        with no_tf32():
            for lo, hi in _split(q_w_t.t(), chunks):
                acc += (af[:, lo:hi] @ wf[lo:hi]).to(torch.int32)
    else:
        ft = FLOAT_METHODS[method]
        with no_tf32():
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
    x = torch.arange(qmin, qmax + 1, dtype=torch.float64, device=s_in.device) * float(s_in)
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


# ---------------------------------------------------------------------------------------------
# PReLU / LeakyReLU, Softmax, GELU tables, LayerNorm, AvgPool2d with per-position divisors
# (spec sections 14 to 17; section 10 for the GELU tables)


# GELU in the forms of section 10: 0.5 * x * erfc(-x / sqrt(2)) and x / (1 + exp(-2z)) equal
# 0.5 * x * (1 + erf(x / sqrt(2))) and 0.5 * x * (1 + tanh(z)), but never add a term that is
# 1 within a few ulp: where GELU(x) ~ x they give exactly x in every libm, so the tables do
# not depend on the last bit of erf/tanh near 1 (which differs between libraries)
def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * torch.erfc(-x / math.sqrt(2.0))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-(2.0 * math.sqrt(2.0 / math.pi)) * (x + 0.044715 * x * x * x)))


LUT_FUNCS["gelu"] = _gelu
LUT_FUNCS["gelu_tanh"] = _gelu_tanh


def prelu(q: torch.Tensor, M_pos: torch.Tensor, M_neg: torch.Tensor, axis: int | None
          ) -> torch.Tensor:
    """``requant(q, M_pos)`` where ``q >= 0``, ``requant(q, M_neg)`` where ``q < 0`` (section
    14); ``M_neg`` per channel along ``axis`` (or one value, ``axis=None``). No saturation."""
    if axis is not None and M_neg.numel() != q.shape[axis]:
        raise ValueError(f"{M_neg.numel()} slopes for {q.shape[axis]} channels")
    if max(float(M_pos.abs().max()), float(M_neg.abs().max())) >= 2**40:
        raise ValueError("a PReLU multiplier of 2^40 or more overflows int64 on int16 inputs")
    q = q.to(torch.int64)
    pos = requant(q, M_pos)
    neg = requant(q, M_neg, axis)
    return torch.where(q >= 0, pos, neg)


SOFTMAX_ONE = 2**15  # exp(0) in the Q15 table
SOFTMAX_FRAC = 30  # fractional bits of the normalised probability before the requant


def softmax_exp_table(s_in: torch.Tensor | float, in_dtype: str) -> torch.Tensor:
    """``round_half_even(2^15 * exp(-k * s_in))`` for ``k = 0 .. qmax - qmin`` (section 15)."""
    qmin, qmax = qrange(in_dtype)
    k = torch.arange(0, qmax - qmin + 1, dtype=torch.float64)
    return torch.round(SOFTMAX_ONE * torch.exp(-k * float(s_in))).to(torch.int64)


def softmax(q: torch.Tensor, dim: int, table: torch.Tensor, M: torch.Tensor | float
            ) -> torch.Tensor:
    """Integer softmax along ``dim`` (section 15), before saturation: ``e = table[max - q]``,
    ``r = floor((e * 2^31 + sum e) / (2 * sum e))`` (``e / sum`` in Q30, half up), then
    ``requant(r, M)`` with ``M = 2^-30 / s_o``."""
    q = q.to(torch.int64)
    if q.numel() == 0:
        return q
    d = q.amax(dim, keepdim=True) - q  # 0 .. qmax - qmin
    e = table[d]
    total = e.sum(dim, keepdim=True)  # >= 2^15 (the maximum contributes exp(0))
    if int(total.max()) * 2**(SOFTMAX_FRAC + 1) >= 2**62:
        raise ValueError("softmax over more than 2^16 elements overflows the int64 division")
    r = torch.div(e * 2**(SOFTMAX_FRAC + 1) + total, 2 * total, rounding_mode="floor")
    return requant(r, M)


LN_FRAC = 24  # fractional bits of the normalised value (x - mean) / sqrt(var + eps)


def ln_guard_bits(n: int, in_dtype: str) -> int:
    """``G``: the largest even number in [0, 16] with ``n^2 * A^2 * 2^G <= 2^62``, ``A = -qmin``
    of the input dtype (section 16); extra fractional bits of the variance, so that ``eps``
    keeps its precision when ``s_in^2 / n^2`` is coarse."""
    A = -qrange(in_dtype)[0]
    if n > 2**16 or n * n * A * A > 2**62:
        raise ValueError(f"layer norm over {n} values of {in_dtype}: the int64 variance would "
                         "overflow (at most 2^16 values with n^2 * 2^(2 * bits) <= 2^62)")
    G = 16
    while n * n * A * A * 2**G > 2**62:
        G -= 2
    return G


def ln_eps_term(eps: float, n: int, s_in: torch.Tensor | float, G: int) -> int:
    """``E = round_half_even(eps * n * n / s_in / s_in * 2^G)`` in float64 (section 16)."""
    v = float(eps) * float(n) * float(n) / float(s_in) / float(s_in) * 2.0**G
    if not math.isfinite(v) or v >= 2**62:
        raise ValueError(f"eps * n^2 / s_in^2 * 2^G = {v:.3g} does not fit the integer variance")
    return int(torch.round(torch.tensor(v, dtype=torch.float64)))


def isqrt(x: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(x))`` exactly for int64 ``0 <= x < 2^52``: the float64 square root is
    within one of it; one correction step each way makes it exact."""
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 2**52):
        raise ValueError("isqrt needs 0 <= x < 2^52")
    r = torch.sqrt(x.to(torch.float64)).floor().to(torch.int64)
    r = r - (r * r > x).to(torch.int64)
    return r + ((r + 1) * (r + 1) <= x).to(torch.int64)


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Number of bits of non-negative int64 values (0 for 0), by exact comparisons."""
    out = torch.zeros_like(x)
    for i in range(63):
        out += (x >= (1 << i)).to(torch.int64)
    return out


def layer_norm_normalize(q: torch.Tensor, dims: tuple[int, ...], E: int, G: int
                         ) -> torch.Tensor:
    """``y = round_half_up(c * 2^(24 + G/2) / sqrt(D))`` with ``c = n * q - S1`` and ``D = (n *
    S2 - S1^2) * 2^G + E`` over ``dims`` (section 16): the normalised value in Q24, by the
    integer rsqrt of the spec. ``G`` from :func:`ln_guard_bits`, ``E`` from
    :func:`ln_eps_term`."""
    q = q.to(torch.int64)
    n = 1
    for d in dims:
        n *= q.shape[d]
    A = int(q.abs().max()) if q.numel() else 0
    if G % 2 or not 0 <= G <= 16 or n * n * A * A * 2**G > 2**62 or not 0 <= E < 2**62:
        raise ValueError(f"layer norm constants G={G}, E={E} do not bound the int64 variance")
    s1 = q.sum(dims, keepdim=True)
    s2 = (q * q).sum(dims, keepdim=True)
    D = ((n * s2 - s1 * s1) << G) + E  # < 2^63
    c = n * q - s1
    k = torch.div(bit_length(D) - 31, 2, rounding_mode="floor")  # D / 4^k in [2^30, 2^32)
    Dn = torch.where(k >= 0, D >> (2 * k).clamp_min(0), D << (-2 * k).clamp_min(0))
    sq = isqrt(Dn << 16)  # floor(2^8 * sqrt(Dn)), in [2^23, 2^24)
    num = c << (32 + G // 2 - k)  # |num| < sqrt(n) * 2^48
    sq_safe = torch.where(D > 0, sq, torch.ones_like(sq))
    y = torch.div(2 * num + sq_safe, 2 * sq_safe, rounding_mode="floor")
    return torch.where(D > 0, y, torch.zeros_like(y))


def layer_norm_affine(y: torch.Tensor, M_w: torch.Tensor, b_i: torch.Tensor) -> torch.Tensor:
    """``requant(requant(y, M_w) + b_i, 2^-8)`` (section 16), ``M_w`` and ``b_i`` shaped to
    broadcast against ``y`` (per normalised element, or per channel). No saturation."""
    m, n = multiplier(M_w)
    v = requant_mn(y, m, n) + b_i
    return (v + 128) >> 8


def pool_out_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (a ceil-mode window must start inside the input or the
    left padding)."""
    out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def avg_pool_divisors(size: int, k: int, s: int, p: int, ceil_mode: bool,
                      count_include_pad: bool) -> torch.Tensor:
    """Per output index along one axis, the number of positions PyTorch divides by (section
    17): the window clipped to the padded input, then (``count_include_pad=False``) to the
    input itself."""
    out = pool_out_size(size, k, s, p, ceil_mode)
    start = torch.arange(out, dtype=torch.int64) * s - p
    end = torch.clamp(start + k, max=size + p)
    if count_include_pad:
        return end - start
    return torch.clamp(end, max=size) - torch.clamp(start, min=0)


# ---------------------------------------------------------------------------------------------
# The onnxruntime target profile (qatkit/fixed_point/ort_profile.py): conv/linear requantization
# as onnxruntime's fused QLinearConv/QGemm compute it, in place of section 4's


def ort_constants(q_w: torch.Tensor, in_dtype: str, q_b: torch.Tensor, s_in: torch.Tensor,
                  s_w: torch.Tensor, s_o: torch.Tensor, who: str) -> torch.Tensor:
    """``scale[c] = float32(float32(s_in * s_w[c]) / s_o)`` (each step one float32 operation),
    after refusing (QK106) inputs onnxruntime does not fuse (16-bit) and an accumulator ``acc +
    q_b`` that a static bound does not keep below 2^31 (onnxruntime's int32 sum would wrap).
    ``q_b``: the exact bias integers (:func:`bias_integers`); one beyond int32 is refused too:
    QLinearConv/QGemm take an int32 bias at ``s_in * s_w``, which cannot hold it (wrapping it
    would be silently wrong)."""
    if in_dtype != "qint8":
        raise fail("QK106", f"target profile 'onnxruntime': {who} receives {in_dtype} inputs; "
                   "onnxruntime fuses only 8-bit groups.", "use qint8 activations")
    if not fits_int32(q_b):
        lo, hi = qrange("qint32")
        c = int((~((q_b >= lo) & (q_b <= hi))).nonzero()[0, 0])
        raise fail("QK106", f"target profile 'onnxruntime': {who}: the bias of output channel "
                   f"{c} is {float(q_b[c]):.6g} at the accumulator scale s_in * s_w = "
                   f"{float(s_in) * float(s_w.flatten()[c]):.4g}, beyond int32; onnxruntime's "
                   "QLinearConv/QGemm take an int32 bias there, which cannot hold it.",
                   "convert without the profile (the integer ONNX flavour holds such a bias "
                   "exactly), or give the layer larger weights or input scale")
    bound = acc_bound(q_w, in_dtype) + int(q_b.abs().max())
    if bound >= INT32_EXACT:
        raise fail("QK106", f"target profile 'onnxruntime': {who} can accumulate {bound} "
                   "(>= 2^31), which onnxruntime's int32 accumulator cannot hold.",
                   "split the layer, or convert without the profile")
    return (s_in.to(torch.float32) * s_w.to(torch.float32)) / s_o.to(torch.float32)


def ort_requant(v: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``round_half_even(float32(v) * scale[c])`` per channel along ``axis``, before saturation:
    torch's int64 -> float32 conversion and float32 multiply round to nearest even, as
    onnxruntime's kernels do."""
    return torch.round(v.to(torch.float32) * along(scale, axis, v.dim()))
