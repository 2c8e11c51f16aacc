"""The fixed-point model agrees bit for bit with the NumPy reference (docs/fixed-point.md).

This file: QuantStub/DeQuantStub; the multiplier encoding and both requantizations (int64, and
the float64 form of section 12, at exact ties and at its bound); Conv2d (groups, depthwise,
stride, padding, dilation, bias, fused ReLU/ReLU6, high-precision int32 output, accumulator into
a fused add with/without ReLU), Linear, ConvTranspose2d; each conv arithmetic (float32, int_mm,
float64) forced; a 4608-tap conv where float32 is provably wrong and int_mm exact; int8 sums past
int32; operands torch._int_mm misreads; whole models with set and calibrated scales. Element-wise
ops, pooling, resizing, lookup tables and FloatFunctional are in tests/test_bitexact_ops.py;
tests/_bitexact.py builds every case through the public workflow.

Property tests run ``B.examples(n)`` examples (QATKIT_BITEXACT_EXAMPLES=10 hunts 10x longer);
the two files take about a minute on one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import qatkit as qk
from qatkit.fixed_point import gemm
from qatkit.fixed_point import kernels as fp
from tests import _bitexact as B
from tests.reference import npref as R

# QK003 warns that a GEMM feeding only a DeQuantStub could keep a high-precision output: these
# tests ask for the quantized output on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::qatkit.base.errors.QatkitWarning")


ACT_MODULE = {None: None, "relu": nn.ReLU, "relu6": nn.ReLU6}


@pytest.fixture
def int_mm_engine() -> Iterator[None]:
    """The ``_int_mm`` engine for int8 layers, whichever engine this machine would pick
    (tests/test_gemm_engine.py covers the float32 one)."""
    with gemm.int8_gemm("int_mm"):
        yield


# ------------------------------------------------------------------------------ §3 stubs


@settings(max_examples=B.examples(150), deadline=None)
@given(seed=B.seeds, dtype=B.dtypes, s=B.scales, kind=st.sampled_from(
    ["normal", "ties", "huge", "tiny"]), n=st.integers(1, 40))
def test_quant_dequant_stub(seed: int, dtype: str, s: float, kind: str, n: int) -> None:
    rng = np.random.default_rng(seed)
    lo, hi = R.QRANGE[dtype]
    if kind == "ties":  # k + 1/2 and k + 1/2 +- 1 ulp in units of s, around and beyond the range
        k = rng.integers(2 * lo, 2 * hi, size=n) + 0.5
        x = (k * s).astype(np.float32)
        x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)),
                            np.nextafter(x, np.float32(-np.inf))])
    elif kind == "huge":
        x = (rng.choice([-1.0, 1.0], size=n) * 10.0 ** rng.uniform(0, 38, size=n))
        x = x.astype(np.float32)
    elif kind == "tiny":
        x = (rng.normal(size=n) * s).astype(np.float32)
    else:
        x = (rng.normal(size=n) * s * hi / 3).astype(np.float32)
    x = x.reshape(1, -1)
    m = B.Chain()
    _, c = B.build(m, torch.from_numpy(x), {"quant": s}, B.qconfig(dtype))
    qx = c.quant(torch.from_numpy(x))
    want = R.quantize(x, s, dtype)
    B.assert_ints(qx, want, dtype, s, "QuantStub")
    y = c.dequant(qx)
    B.assert_floats(y, R.dequantize(want, s), "DeQuantStub")
    B.assert_floats(c(torch.from_numpy(x)), R.dequantize(want, s), "whole model")
    # float64 input: the stub first rounds it to float32 (section 3)
    B.assert_ints(c.quant(torch.from_numpy(x.astype(np.float64))), want, dtype, s, "f64 input")


# ------------------------------------------------------------------------------ §4 requant

_real_multipliers = st.one_of(
    st.just(0.0),
    st.tuples(st.sampled_from([-1.0, 1.0]), st.integers(-70, 30)).map(lambda t: t[0] * 2.0**t[1]),
    st.tuples(st.sampled_from([-1.0, 1.0]), st.floats(-70, 30)).map(lambda t: t[0] * 2.0**t[1]),
)


def _ties(m: int, n: int, lim: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Values v (|v| <= lim) with v * m / 2^n exactly k + 1/2, where the rounding rule of
    section 4 decides; zeros when there are none."""
    if n < 1 or m == 0:
        return np.zeros(size, dtype=np.int64)
    t = (abs(m) & -abs(m)).bit_length() - 1  # m = odd * 2^t
    if t > n - 1:
        return np.zeros(size, dtype=np.int64)
    mod = 2 ** (n - t)  # v * odd == 2^(n-1-t) (mod 2^(n-t)); the same v for -m
    v0 = (2 ** (n - 1 - t) * pow(abs(m) >> t, -1, mod)) % mod
    v0 -= mod * (v0 > mod // 2)
    k_max = max((lim - abs(v0)) // mod, 0)
    v = [v0 + mod * int(k) for k in rng.integers(-k_max, k_max + 1, size=size)]
    v = [x if abs(x) <= lim else 0 for x in v]
    assert all(x == 0 or (x * m) % 2**n == 2 ** (n - 1) for x in v)
    return np.array(v, dtype=np.int64)


@settings(max_examples=B.examples(400), deadline=None)
@given(M=st.lists(_real_multipliers, min_size=1, max_size=4), seed=B.seeds,
       mag=st.integers(0, 47))
def test_multiplier_and_int64_requant(M: list[float], seed: int, mag: int) -> None:
    """The encoding of M and the int64 requantization, per tensor and per channel, over
    multipliers from 2^-70 (n >= 63) to 2^30 (n < 0) and |v| < 2^47, exact ties included."""
    rng = np.random.default_rng(seed)
    v = rng.integers(-(2**mag), 2**mag + 1, size=(3, len(M), 4), dtype=np.int64)
    v[0, :, 0] = 2**mag - 1
    v[0, :, 1] = -(2**mag) + 1
    # keep v * M inside int64, where section 4 defines the result
    lim = [min(int(2**61 / max(abs(m), 2.0**-80)), 2**47 - 1) for m in M]
    v = np.stack([np.clip(v[:, i], -lim[i], lim[i]) for i in range(len(M))], axis=1)
    for i, m in enumerate(M):
        v[1, i] = _ties(*R.multiplier(m), lim[i], rng, v.shape[2])
    for i, m in enumerate(M):
        mt, nt = fp.multiplier(m)
        assert (int(mt), int(nt)) == R.multiplier(m), m
        got = fp.requant(torch.from_numpy(v[:, i]), m)
        assert np.array_equal(got.numpy(), R.requant(v[:, i], m)), (m, int(mt), int(nt))
    got = fp.requant(torch.from_numpy(v), torch.tensor(M, dtype=torch.float64), axis=1)
    assert np.array_equal(got.numpy(), R.requant(v, np.array(M), axis=1))


@settings(max_examples=B.examples(400), deadline=None)
@given(seed=B.seeds, c=st.integers(1, 4),
       n=st.lists(st.one_of(st.integers(-20, 60), st.integers(14, 40)), min_size=4, max_size=4),
       pow2_m=st.booleans(), qb_mag=st.integers(0, 31), near_bound=st.booleans(),
       acc_kind=st.sampled_from(["int32", "float32", "float64", "int64"]))
def test_float64_requant_plan(seed: int, c: int, n: list[int], pow2_m: bool, qb_mag: int,
                              near_bound: bool, acc_kind: str) -> None:
    """The float64 requantization of conv/linear outputs (spec section 12) gives the integers of
    section 4 whenever requant_plan accepts, up to its bound |acc| + |q_b| < 2^37, for the
    accumulators of every conv method (int32, float32, float64) and exact ties."""
    rng = np.random.default_rng(seed)
    m = (2**14 if pow2_m else rng.integers(2**14, 2**15, size=c)) * rng.choice([-1, 1], size=c)
    nn_ = np.array(n[:c])
    q_b = rng.integers(-(2**qb_mag), 2**qb_mag, size=c).clip(-(2**31), 2**31 - 1)
    q_b = np.clip(q_b, -(2 ** (45 + np.minimum(nn_, 0))), 2 ** (45 + np.minimum(nn_, 0)))
    bound = {"int32": 2**31 - 1, "float32": 2**24 - 1}.get(acc_kind,
                                                           2**37 - 1 - int(np.abs(q_b).max()))
    acc = rng.integers(-bound, bound + 1, size=(5, c, 3))
    if near_bound:
        acc[0, :, 0], acc[0, :, 1] = bound, -bound
    # stay where section 4 is defined (|acc + q_b| * m * 2^-n inside int64)
    lim = np.minimum(bound, 2 ** (46 + np.minimum(nn_, 0)) - np.abs(q_b))
    acc = np.clip(acc, -lim[None, :, None], lim[None, :, None])
    for i in range(c):  # acc + q_b at exact ties
        ties = _ties(int(m[i]), int(nn_[i]), int(lim[i]), rng, 6) - q_b[i]
        ok = np.abs(ties) <= lim[i]
        acc[1:3, i] = np.where(ok, ties, 0).reshape(2, 3)
    plan = fp.requant_plan(torch.from_numpy(m), torch.from_numpy(nn_), torch.from_numpy(q_b),
                           bound)
    assert (plan is None) == (nn_.max() > 52)
    if plan is None:
        return
    t = torch.from_numpy(acc).to(getattr(torch, acc_kind))
    lo, hi = R.QRANGE["qint32"]
    got = fp.requant_f64(t, plan, lo, hi, "qint32", 1)
    M = m.astype(np.float64) * np.exp2(-nn_.astype(np.float64))
    want = R.sat(R.requant(acc + q_b[None, :, None], M, axis=1), "qint32")
    assert np.array_equal(B.as_np(got), want)


# ------------------------------------------------------------------------------ §5 conv2d


@st.composite
def conv_cases(draw: st.DrawFn, max_groups: int = 3) -> dict:
    depthwise = draw(st.booleans())
    groups = draw(st.integers(1, max_groups))
    cin_g = 1 if depthwise else draw(st.integers(1, 3))
    cout_g = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    need_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    need_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    h, w = draw(st.integers(need_h, need_h + 4)), draw(st.integers(need_w, need_w + 4))
    return dict(n=draw(st.integers(1, 2)), cin=groups * cin_g, cout=groups * cout_g,
                k=(kh, kw), stride=stride, padding=padding, dilation=dilation, groups=groups,
                hw=(h, w), bias=draw(st.sampled_from(["none", "normal", "normal", "huge"])),
                wfill=draw(B.wfills), xfill=draw(B.fills), seed=draw(B.seeds))


def _conv_setup(case: dict, in_dtype: str) -> tuple[nn.Conv2d, np.ndarray, np.ndarray,
                                                     np.ndarray | None]:
    rng = np.random.default_rng(case["seed"])
    conv = nn.Conv2d(case["cin"], case["cout"], case["k"], case["stride"], case["padding"],
                     case["dilation"], case["groups"], bias=case["bias"] != "none")
    w = B.float_weights(rng, conv.weight.shape, case["wfill"])
    b = B.float_bias(rng, case["cout"], case["bias"])
    B.set_param(conv.weight, w)
    B.set_param(conv.bias, b)
    q = B.ints(rng, (case["n"], case["cin"], *case["hw"]), in_dtype, case["xfill"])
    return conv, w, q, b


def _conv_out_hw(case: dict) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        (case["hw"][i] + 2 * case["padding"][i] - case["dilation"][i] * (case["k"][i] - 1) - 1)
        // case["stride"][i] + 1 for i in range(2))


@settings(max_examples=B.examples(250), deadline=None)
@given(case=conv_cases(), in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales,
       s_out=B.scales, act=st.sampled_from([None, "relu", "relu6", "hp"]))
def test_conv2d(case: dict, in_dtype: str, out_dtype: str, s_in: float, s_out: float,
                act: str | None) -> None:
    conv, w, q, b = _conv_setup(case, in_dtype)
    hp = act == "hp"
    act = None if hp else act
    ops = [conv] + ([ACT_MODULE[act]()] if act else [])
    example = torch.randn(case["n"], case["cin"], *case["hw"])
    scales = {"quant": s_in} if hp else {"quant": s_in, "ops.0": s_out}
    _, c = B.build(B.Chain(*ops), example, scales,
                   B.qconfig(out_dtype, {"quant": in_dtype}, high_precision=hp))
    qc = c.ops[0]
    assert qc.output_mode == ("high_precision" if hp else "quantized")
    assert qc.activation == act
    s_w = qc.weight_scale.numpy()
    assert np.array_equal(s_w, B.weight_scales_from_range(w, b)), "weight scales (section 2)"
    assert np.array_equal(B.as_np(qc.weight), R.quantize_weight(w, s_w)), "int8 weights"
    got, want = B.agree(lambda: B.run_ops(c, B.qtensor(q, s_in, in_dtype)), lambda: R.conv2d(
        q, s_in, w, b, s_w, s_out, "qint32" if hp else out_dtype, case["stride"],
        case["padding"], case["dilation"], case["groups"], activation=act,
        mode="accumulator" if hp else "quantized"))
    if want is None:
        return
    if hp:
        s_acc = R.accumulator_output_scale(b, s_in, s_w)
        B.assert_ints(got, want, "qint32", s_acc, "conv2d high precision")
        B.assert_floats(c.dequant(got), R.dequantize(want, s_acc, axis=1), "dequant of acc")
    else:
        B.assert_ints(got, want, out_dtype, s_out, f"conv2d {act}")


@pytest.mark.parametrize("path", ["float64", "int64"])
@settings(max_examples=B.examples(60), deadline=None)
@given(case=conv_cases(), in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales,
       s_out=B.scales, act=st.sampled_from([None, "relu", "relu6"]))
def test_conv2d_requant_paths(path: str, case: dict, in_dtype: str, out_dtype: str,
                              s_in: float, s_out: float, act: str | None) -> None:
    """The quantized conv output through either requantization (forced), as section 4."""
    conv, w, q, b = _conv_setup(case, in_dtype)
    ops = [conv] + ([ACT_MODULE[act]()] if act else [])
    _, c = B.build(B.Chain(*ops), torch.randn(case["n"], case["cin"], *case["hw"]),
                   {"quant": s_in, "ops.0": s_out}, B.qconfig(out_dtype, {"quant": in_dtype}))
    plan = fp.requant_plan if path == "float64" else (lambda *a: None)
    s_w = c.ops[0].weight_scale.numpy()
    with mock.patch.object(fp, "requant_plan", plan):
        got, want = B.agree(lambda: B.run_ops(c, B.qtensor(q, s_in, in_dtype)), lambda: R.conv2d(
            q, s_in, w, b, s_w, s_out, out_dtype, case["stride"], case["padding"],
            case["dilation"], case["groups"], activation=act))
    if want is None:
        return
    cache = c.ops[0]._cache[(s_in, in_dtype)]
    # float64 unless forced off, or a shift n > 52 (a zero weight channel's tiny multiplier),
    # or a bias beyond int32 (the int64 form of section 5)
    assert (cache["f64"] is None) == (path == "int64" or cache["wide"] is not None
                                      or int(cache["mn"][1].max()) > 52)
    B.assert_ints(got, want, out_dtype, s_out, f"conv2d, {path} requant")


@settings(max_examples=B.examples(120), deadline=None)
@given(case=conv_cases(), in_dtype=B.dtypes, b_dtype=B.dtypes, out_dtype=B.dtypes,
       s_in=B.scales, s_b=B.scales, s_out=B.scales, relu=st.booleans(), bfill=B.fills)
def test_conv2d_fused_add(case: dict, in_dtype: str, b_dtype: str, out_dtype: str, s_in: float,
                          s_b: float, s_out: float, relu: bool, bfill: str) -> None:
    """conv + add (+ReLU): the int32 accumulator enters the add with its per-channel scale."""

    class ConvAdd(nn.Module):
        def __init__(self, conv: nn.Conv2d) -> None:
            super().__init__()
            self.qa, self.qb, self.conv = qk.QuantStub(), qk.QuantStub(), conv
            self.add = qk.FloatFunctional()
            self.relu = nn.ReLU() if relu else nn.Identity()
            self.dequant = qk.DeQuantStub()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.relu(self.add.add(self.conv(self.qa(x)), self.qb(y))))

    conv, w, q, b = _conv_setup(case, in_dtype)
    oshape = (case["n"], case["cout"], *_conv_out_hw(case))
    qy = B.ints(np.random.default_rng(case["seed"] + 1), oshape, b_dtype, bfill)
    example = (torch.randn(case["n"], case["cin"], *case["hw"]), torch.randn(oshape))
    _, c = B.build(ConvAdd(conv), example, {"qa": s_in, "qb": s_b, "add": s_out},
                   B.qconfig(out_dtype, {"qa": in_dtype, "qb": b_dtype}))
    assert c.conv.output_mode == "accumulator"
    assert c.add.fused_activation == ("relu" if relu else None)
    s_w = c.conv.weight_scale.numpy()
    s_acc = R.accumulator_output_scale(b, s_in, s_w)
    acc, want_acc = B.agree(lambda: c.conv(B.qtensor(q, s_in, in_dtype)), lambda: R.conv2d(
        q, s_in, w, b, s_w, s_out, "qint32", case["stride"], case["padding"], case["dilation"],
        case["groups"], mode="accumulator"))
    if want_acc is None:
        return
    B.assert_ints(acc, want_acc, "qint32", s_acc, "conv accumulator")
    got = c.relu(c.add.add(acc, B.qtensor(qy, s_b, b_dtype)))
    want = R.add(want_acc, s_acc, qy, s_b, s_out, out_dtype, relu=relu, axis_a=1)
    B.assert_ints(got, want, out_dtype, s_out, "conv + add")


# ------------------------------------------------------------------------------ §5 linear


@settings(max_examples=B.examples(150), deadline=None)
@given(seed=B.seeds, lead=st.sampled_from([(1,), (3,), (2, 3)]), k=st.integers(1, 40),
       o=st.integers(1, 6), in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales,
       s_out=B.scales, act=st.sampled_from([None, "relu", "hp"]), wfill=B.wfills,
       xfill=B.fills, bias=st.sampled_from(["none", "normal", "huge"]))
def test_linear(seed: int, lead: tuple, k: int, o: int, in_dtype: str, out_dtype: str,
                s_in: float, s_out: float, act: str | None, wfill: str, xfill: str,
                bias: str) -> None:
    rng = np.random.default_rng(seed)
    lin = nn.Linear(k, o, bias=bias != "none")
    w, b = B.float_weights(rng, (o, k), wfill), B.float_bias(rng, o, bias)
    B.set_param(lin.weight, w)
    B.set_param(lin.bias, b)
    hp = act == "hp"
    act = None if hp else act
    ops = [lin] + ([nn.ReLU()] if act else [])
    q = B.ints(rng, (*lead, k), in_dtype, xfill)
    scales = {"quant": s_in} if hp else {"quant": s_in, "ops.0": s_out}
    _, c = B.build(B.Chain(*ops), torch.randn(*lead, k), scales,
                   B.qconfig(out_dtype, {"quant": in_dtype}, high_precision=hp))
    ql = c.ops[0]
    assert ql.output_mode == ("high_precision" if hp else "quantized")
    assert ql.activation == act
    s_w = ql.weight_scale.numpy()
    assert np.array_equal(s_w, B.weight_scales_from_range(w, b))
    got, want = B.agree(lambda: B.run_ops(c, B.qtensor(q, s_in, in_dtype)), lambda: R.linear(
        q, s_in, w, b, s_w, s_out, "qint32" if hp else out_dtype, activation=act,
        mode="accumulator" if hp else "quantized"))
    if want is None:
        return
    if hp:
        s_acc = R.accumulator_output_scale(b, s_in, s_w)
        B.assert_ints(got, want, "qint32", s_acc, "linear high precision")
        B.assert_floats(c.dequant(got), R.dequantize(want, s_acc, axis=-1), "dequant of acc")
    else:
        B.assert_ints(got, want, out_dtype, s_out, f"linear {act}")


# ------------------------------------------------------------------------------ §5 conv transpose


@settings(max_examples=B.examples(120), deadline=None)
@given(data=st.data(), in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales, s_out=B.scales,
       hp=st.booleans(), wfill=B.wfills, xfill=B.fills, seed=B.seeds,
       bias=st.sampled_from(["none", "normal", "huge"]))
def test_conv_transpose2d(data: st.DataObject, in_dtype: str, out_dtype: str, s_in: float,
                          s_out: float, hp: bool, wfill: str, xfill: str, seed: int,
                          bias: str) -> None:
    d = data.draw
    groups = d(st.integers(1, 3))
    cin, cout = groups * d(st.integers(1, 3)), groups * d(st.integers(1, 3))
    k = (d(st.integers(1, 3)), d(st.integers(1, 3)))
    stride = (d(st.integers(1, 3)), d(st.integers(1, 3)))
    dilation = (d(st.integers(1, 2)), d(st.integers(1, 2)))
    out_pad = tuple(d(st.integers(0, max(stride[i], dilation[i]) - 1)) for i in range(2))
    hw = (d(st.integers(1, 4)), d(st.integers(1, 4)))
    # padding up to what leaves an output of at least one sample
    padding = tuple(d(st.integers(0, ((hw[i] - 1) * stride[i] + dilation[i] * (k[i] - 1)
                                      + out_pad[i]) // 2)) for i in range(2))
    n = d(st.integers(1, 2))
    rng = np.random.default_rng(seed)
    ct = nn.ConvTranspose2d(cin, cout, k, stride, padding, out_pad, groups, bias != "none",
                            dilation)
    w = B.float_weights(rng, ct.weight.shape, wfill, channel_axis=1)
    b = B.float_bias(rng, cout, bias)
    B.set_param(ct.weight, w)
    B.set_param(ct.bias, b)
    q = B.ints(rng, (n, cin, *hw), in_dtype, xfill)
    scales = {"quant": s_in} if hp else {"quant": s_in, "ops.0": s_out}
    _, c = B.build(B.Chain(ct), torch.randn(n, cin, *hw), scales,
                   B.qconfig(out_dtype, {"quant": in_dtype}, high_precision=hp))
    s_w = c.ops[0].weight_scale.numpy()
    # per output channel o = g * cout/groups + j: the weights w[g's input channels, j]
    cin_g, cout_g = cin // groups, cout // groups
    by_out = np.stack([w[(o // cout_g) * cin_g:(o // cout_g + 1) * cin_g, o % cout_g]
                       for o in range(cout)])
    assert np.array_equal(s_w, B.weight_scales_from_range(by_out, b))
    got, want = B.agree(lambda: B.run_ops(c, B.qtensor(q, s_in, in_dtype)),
                        lambda: R.conv_transpose2d(
                            q, s_in, w, b, s_w, s_out, "qint32" if hp else out_dtype, stride,
                            padding, out_pad, dilation, groups,
                            mode="accumulator" if hp else "quantized"))
    if want is None:
        return
    if hp:
        s_acc = R.accumulator_output_scale(b, s_in, s_w)
        B.assert_ints(got, want, "qint32", s_acc, "conv_transpose2d high precision")
    else:
        B.assert_ints(got, want, out_dtype, s_out, "conv_transpose2d")


# ------------------------------------------------------------------------------ §12 methods


@pytest.mark.parametrize("method", ["float32", "int_mm", "float64"])
@settings(max_examples=B.examples(40), deadline=None)
@given(case=conv_cases(max_groups=1), s_in=B.scales, s_out=B.scales, hp=st.booleans())
def test_conv2d_each_method(method: str, case: dict, s_in: float, s_out: float, hp: bool
                            ) -> None:
    """Each exact arithmetic, forced, agrees with the reference (int8 input, groups=1: the
    float32 bound 128 * 27 taps * 128 < 2^24 holds for every such conv)."""
    conv, w, q, b = _conv_setup(case, "qint8")
    scales = {"quant": s_in} if hp else {"quant": s_in, "ops.0": s_out}
    _, c = B.build(B.Chain(conv), torch.randn(case["n"], case["cin"], *case["hw"]), scales,
                   B.qconfig("qint8", high_precision=hp))
    assert fp.acc_bound(c.ops[0].weight, "qint8") < fp.F32_EXACT
    s_w = c.ops[0].weight_scale.numpy()
    with mock.patch.object(fp, "conv_method", lambda *a: method):
        got, want = B.agree(lambda: c.ops[0](B.qtensor(q, s_in, "qint8")), lambda: R.conv2d(
            q, s_in, w, b, s_w, s_out, "qint32" if hp else "qint8", case["stride"],
            case["padding"], case["dilation"], case["groups"],
            mode="accumulator" if hp else "quantized"))
    if want is None:
        return
    assert c.ops[0]._cache[(s_in, "qint8")]["method"] == method
    B.assert_ints(got, want, what=f"conv2d by {method}")


@pytest.mark.parametrize("method", ["float32", "int_mm", "float64"])
@settings(max_examples=B.examples(30), deadline=None)
@given(seed=B.seeds, k=st.integers(1, 64), o=st.integers(1, 5), s_in=B.scales,
       xfill=B.fills, wfill=B.fills)
def test_linear_each_method(method: str, seed: int, k: int, o: int, s_in: float, xfill: str,
                            wfill: str) -> None:
    rng = np.random.default_rng(seed)
    lin = nn.Linear(k, o)
    w, b = B.float_weights(rng, (o, k), wfill), B.float_bias(rng, o, "normal")
    B.set_param(lin.weight, w)
    B.set_param(lin.bias, b)
    q = B.ints(rng, (3, k), "qint8", xfill)
    _, c = B.build(B.Chain(lin), torch.randn(3, k), {"quant": s_in},
                   B.qconfig("qint8", high_precision=True))
    s_w = c.ops[0].weight_scale.numpy()
    with mock.patch.object(fp, "conv_method", lambda *a: method):
        got, want = B.agree(lambda: c.ops[0](B.qtensor(q, s_in, "qint8")), lambda: R.linear(
            q, s_in, w, b, s_w, 1.0, "qint32", mode="accumulator"))
    if want is None:
        return
    B.assert_ints(got, want, what=f"linear by {method}")


def _extreme_conv(cin: int, in_dtype: str, groups: int = 1) -> tuple[nn.Conv2d, np.ndarray,
                                                                     np.ndarray]:
    """A 3x3 conv whose partial sums go far beyond 2^24: all inputs and weights at extremes of
    one sign per output channel (products 127 * 127 = 16129 are odd, so float32 sums round),
    and a channel whose large partial sums cancel to a small total."""
    lo, hi = R.QRANGE[in_dtype]
    conv = nn.Conv2d(cin, 4, 3, groups=groups, bias=False)
    cg = cin // groups
    w = np.empty((4, cg, 3, 3), dtype=np.float32)
    # +-1.5 / float32(1.5 / 127.5) is exactly +-127.5: q_w = 127 (saturated 128) and -128
    w[0], w[1] = 1.5, -1.5
    w[2, : cg // 2], w[2, cg // 2:] = 1.5, -1.5
    w[3] = np.where(np.arange(cg)[:, None, None] % 3 == 0, -1.5, 1.5)
    B.set_param(conv.weight, w)
    q = np.full((1, cin, 5, 5), hi, dtype=np.int64)
    q[:, ::7] = lo
    return conv, w, q


@pytest.mark.usefixtures("int_mm_engine")
def test_large_k_int_mm_is_exact_where_float32_is_not() -> None:
    """512 in-channels x 3x3 = 4608 taps of extreme int8 values: the int_mm path is exact, a
    float32 convolution of the same integers is not (so this test has teeth)."""
    conv, w, q = _extreme_conv(512, "qint8")
    s_in = 2.0**-5
    _, c = B.build(B.Chain(conv), torch.randn(1, 512, 5, 5), {"quant": s_in},
                   B.qconfig("qint8", high_precision=True))
    qc = c.ops[0]
    q_w = B.as_np(qc.weight)
    assert set(np.unique(q_w)) <= {-128, 127} and (q_w == -128).any() and (q_w == 127).any()
    assert fp.conv_method(qc.weight, "qint8", 1) == "int_mm"
    got = qc(B.qtensor(q, s_in, "qint8"))
    assert qc._cache[(s_in, "qint8")]["method"] == "int_mm"
    s_w = qc.weight_scale.numpy()
    exact = R.conv2d_acc(q, R.quantize_weight(w, s_w), None)
    assert np.abs(exact).max() > 2**25  # far beyond float32's exact integers
    B.assert_ints(got, exact, "qint32", R.accumulator_scale(s_in, s_w), "int_mm acc")
    # dequantized in float64 (these integers are not all float32 numbers)
    B.assert_floats(c.dequant(got), R.dequantize(exact, R.accumulator_scale(s_in, s_w), axis=1),
                    "dequant of a large accumulator")
    f32 = F.conv2d(torch.from_numpy(q).float(), torch.from_numpy(q_w).float())
    assert not np.array_equal(f32.to(torch.int64).numpy(), exact), \
        "float32 conv was exact here: the large-K case lost its teeth"
    # the float32 method, forced, is wrong here too; float64 is exact
    assert not np.array_equal(B.as_np(fp.conv2d(torch.from_numpy(q), qc.weight, (1, 1), (0, 0),
                                                (1, 1), 1, "float32")), exact)
    assert np.array_equal(B.as_np(fp.conv2d(torch.from_numpy(q), qc.weight, (1, 1), (0, 0),
                                            (1, 1), 1, "float64")), exact)
    # and through a quantized output: requant of the exact int32 accumulator
    s_out = B.f32(s_in * float(s_w.max()) * 2**19)
    _, c2 = B.build(B.Chain(conv, nn.ReLU()), torch.randn(1, 512, 5, 5),
                    {"quant": s_in, "ops.0": s_out}, B.qconfig("qint8"))
    want = R.conv2d(q, s_in, w, None, s_w, s_out, "qint8", activation="relu")
    assert len(np.unique(want)) > 2  # not all saturated
    B.assert_ints(B.run_ops(c2, B.qtensor(q, s_in, "qint8")), want, "qint8", s_out, "requant")


@pytest.mark.parametrize("engine,method", [("int_mm", "int_mm"), ("float32", "float32_split")])
def test_large_k_linear(engine: str, method: str) -> None:
    """The same for Linear: K = 4608 extreme int8 values, by ``_int_mm`` and by float32 over
    ranges of K (tests/test_gemm_engine.py)."""
    k = 4608
    lin = nn.Linear(k, 3, bias=False)
    w = np.full((3, k), 1.5, dtype=np.float32)  # q_w = 127 and -128, as above
    w[1] = -1.5
    w[2, k // 2:] = -1.5
    B.set_param(lin.weight, w)
    q = np.full((2, k), 127, dtype=np.int64)
    q[1, ::5] = -128
    _, c = B.build(B.Chain(lin), torch.randn(2, k), {"quant": 0.25},
                   B.qconfig("qint8", high_precision=True))
    with gemm.int8_gemm(engine):
        assert fp.conv_method(c.ops[0].weight, "qint8", 1) == method
        got = c.ops[0](B.qtensor(q, 0.25, "qint8"))
    assert next(iter(c.ops[0]._cache.values()))["method"] == method
    s_w = c.ops[0].weight_scale.numpy()
    want = R.linear(q, 0.25, w, None, s_w, 1.0, "qint32", mode="accumulator")
    assert np.abs(want).max() > 2**25
    B.assert_ints(got, want, "qint32", what=f"linear {method}")
    q_w = torch.from_numpy(R.quantize_weight(w, s_w)).float()
    f32 = (torch.from_numpy(q).float() @ q_w.T).to(torch.int64).numpy()
    assert not np.array_equal(f32, want), "float32 matmul was exact: no teeth"


@pytest.mark.usefixtures("int_mm_engine")
@pytest.mark.parametrize("in_dtype,groups,want_method", [
    ("qint8", 1, "int_mm"), ("qint8", 2, "float64"), ("qint16", 1, "float64")])
def test_large_k_float64_and_int_mm_choice(in_dtype: str, groups: int, want_method: str) -> None:
    """Over the float32 bound, int16 inputs and grouped convs take the float64 path; exact."""
    conv, w, q = _extreme_conv(512, in_dtype, groups)
    s_in = 2.0**-3
    _, c = B.build(B.Chain(conv), torch.randn(1, 512, 5, 5), {"quant": s_in},
                   B.qconfig(in_dtype, high_precision=True))
    if in_dtype == "qint16":  # past 2^24, within the int32 output (which refuses more)
        q = q // 32
    got = c.ops[0](B.qtensor(q, s_in, in_dtype))
    assert c.ops[0]._cache[(s_in, in_dtype)]["method"] == want_method
    s_w = c.ops[0].weight_scale.numpy()
    want = R.conv2d(q, s_in, w, None, s_w, 1.0, "qint32", groups=groups, mode="accumulator")
    assert np.abs(want).max() >= 2**24
    B.assert_ints(got, want, "qint32", what=f"{in_dtype} groups={groups}")


def test_int_mm_on_non_contiguous_input() -> None:
    """The NHWC im2col views use the input's real strides (here a channel slice and an
    NHWC-contiguous tensor)."""
    rng = np.random.default_rng(7)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
    w = B.float_weights(rng, conv.weight.shape, "random")
    B.set_param(conv.weight, w)
    B.set_param(conv.bias, B.float_bias(rng, 5, "normal"))
    _, c = B.build(B.Chain(conv), torch.randn(2, 3, 7, 6), {"quant": 0.5},
                   B.qconfig("qint8", high_precision=True))
    s_w = c.ops[0].weight_scale.numpy()
    full = B.ints(rng, (2, 6, 7, 6), "qint8", "random")
    t = torch.from_numpy(full).to(torch.int8)
    for q_t in (t[:, 2:5], t[:, 1:4].contiguous(memory_format=torch.channels_last)):
        with mock.patch.object(fp, "conv_method", lambda *a: "int_mm"):
            c.ops[0]._cache.clear()
            got = c.ops[0](qk.QTensor(q_t, torch.tensor(0.5), "qint8"))
        want = R.conv2d(B.as_np(q_t), 0.5, w, conv.bias.detach().numpy(), s_w, 1.0, "qint32",
                        2, 1, mode="accumulator")
        B.assert_ints(got, want, "qint32", what="int_mm strided input")


@pytest.mark.parametrize("op", ["linear", "conv2d", "matmul"])
def test_int8_sums_beyond_int32(op: str) -> None:
    """144000 taps of extreme int8 values: |acc| reaches 128 * 127 * 144000 > 2^31, where
    torch._int_mm's int32 accumulation would wrap around; the exact sum is required (and a
    high-precision output int32 cannot hold is refused)."""
    k = 144_000
    rng = np.random.default_rng(5)
    q = np.full((1, k), -128, dtype=np.int64)
    q[0, :100] = rng.integers(-128, 128, size=100)
    w = np.full((2, k), 1.5, dtype=np.float32)  # q_w = 127 and -128
    w[1] = -1.5
    s_in = 0.5
    if op == "matmul":
        q_w = R.quantize_weight(w, np.full(2, B.f32(1.5 / 127.5))).T.copy()
        _, c = B.build(B.Functional("matmul", 2), (torch.randn(1, k), torch.randn(k, 2)),
                       {"q.0": s_in, "q.1": 0.25, "ff": 2.0**14}, B.qconfig("qint16"))
        got = c.ff.matmul(B.qtensor(q, s_in, "qint8"), B.qtensor(q_w, 0.25, "qint8"))
        want = R.matmul(q, s_in, q_w, 0.25, 2.0**14, "qint16")
        assert np.abs(want).max() < 32767  # not saturated: the exact sum matters
        B.assert_ints(got, want, "qint16", what="matmul")
        return
    if op == "linear":
        mod, shape, q_in = nn.Linear(k, 2, bias=False), (1, k), q
    else:  # 3x3 conv, 16000 input channels
        mod, shape = nn.Conv2d(16000, 2, 3, bias=False), (1, 16000, 3, 3)
        q_in = q.reshape(shape)
        w = w.reshape(2, 16000, 3, 3)
    B.set_param(mod.weight, w)
    _, c = B.build(B.Chain(mod), torch.randn(shape), {"quant": s_in},
                   B.qconfig("qint8", high_precision=True))
    s_w = c.ops[0].weight_scale.numpy()
    ref = R.linear if op == "linear" else R.conv2d
    with pytest.raises(R.Refused):  # the spec refuses an int32 output it cannot hold
        ref(q_in, s_in, w, None, s_w, 1.0, "qint32", mode="accumulator")
    with pytest.raises(qk.QatkitError, match=r"QK105.*ops\.0.*beyond int32"):
        c.ops[0](B.qtensor(q_in, s_in, "qint8"))
    assert fp.acc_bound(c.ops[0].weight, "qint8") >= 2**31
    assert c.ops[0]._cache[(s_in, "qint8")]["method"] == "float64"
    s_out = B.f32(s_in * float(s_w.max()) * 2**25)  # a quantized output, not saturated
    _, c = B.build(B.Chain(mod), torch.randn(shape), {"quant": s_in, "ops.0": s_out},
                   B.qconfig("qint8"))
    want = ref(q_in, s_in, w, None, s_w, s_out, "qint8")
    assert np.abs(want).max() < 127
    B.assert_ints(c.ops[0](B.qtensor(q_in, s_in, "qint8")), want, "qint8", what=op)


@pytest.mark.usefixtures("int_mm_engine")
def test_int_mm_single_channel_full_width_kernel() -> None:
    """A one-channel input and a kernel as wide as the input with > 1032 taps: int_mm is the
    natural choice and the im2col matrix is an overlapping view of the input (rows 32 apart,
    1056 long), which torch._int_mm must not be given as it is."""
    rng = np.random.default_rng(3)
    conv = nn.Conv2d(1, 2, (33, 32), bias=False)
    w = B.float_weights(rng, conv.weight.shape, "extremes")
    B.set_param(conv.weight, w)
    q = B.ints(rng, (1, 1, 40, 32), "qint8", "random")
    _, c = B.build(B.Chain(conv), torch.randn(1, 1, 40, 32), {"quant": 0.125},
                   B.qconfig("qint8", high_precision=True))
    got = c.ops[0](B.qtensor(q, 0.125, "qint8"))
    assert c.ops[0]._cache[(0.125, "qint8")]["method"] == "int_mm"
    s_w = c.ops[0].weight_scale.numpy()
    want = R.conv2d(q, 0.125, w, None, s_w, 1.0, "qint32", mode="accumulator")
    B.assert_ints(got, want, "qint32", what="int_mm, overlapping im2col view")


# ------------------------------------------------------------------------------ whole models


class SmallNet(nn.Module):
    """conv+bn+relu, conv+bn+add+relu, adaptive average pool, flatten, linear (the smoke
    test's network)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.c1, self.b1, self.r1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.add, self.r2 = qk.FloatFunctional(), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.r1(self.b1(self.c1(x)))
        x = self.r2(self.add.add(self.b2(self.c2(x)), x))
        return self.dequant(self.fc(self.pool(x).flatten(1)))


def _small_net(seed: int) -> SmallNet:
    torch.manual_seed(seed)
    m = SmallNet()
    for bn in (m.b1, m.b2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def _small_net_reference(p: nn.Module, c: nn.Module, x: np.ndarray, dtype: str) -> np.ndarray:
    """The network in reference ops, with the folded float weights of the prepared model and
    the scales of the converted one."""
    def wb(mod: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        return mod.weight.detach().numpy(), mod.bias.detach().numpy()

    s0 = float(c.quant.out_scale)
    q = R.quantize(x, s0, dtype)
    (w1, b1), (w2, b2), (wf, bf) = wb(p.c1), wb(p.c2), wb(p.fc)
    s1, s_add, s_pool = (float(c.c1.out_scale), float(c.add.out_scale),
                         float(c.pool.out_scale))
    sw1, sw2, swf = (c.c1.weight_scale.numpy(), c.c2.weight_scale.numpy(),
                     c.fc.weight_scale.numpy())
    q1 = R.conv2d(q, s0, w1, b1, sw1, s1, dtype, padding=1, activation="relu")
    acc2 = R.conv2d(q1, s1, w2, b2, sw2, 1.0, "qint32", padding=1, mode="accumulator")
    q2 = R.add(acc2, R.accumulator_scale(s1, sw2), q1, s1, s_add, dtype, relu=True, axis_a=1)
    qp = R.adaptive_avg_pool2d(q2, s_add, 1, s_pool, dtype).reshape(q2.shape[0], -1)
    acc = R.linear(qp, s_pool, wf, bf, swf, 1.0, "qint32", mode="accumulator")
    return R.dequantize(acc, R.accumulator_scale(s_pool, swf), axis=-1)


@pytest.mark.parametrize("march", ["nash-e", "nash-p"])
@settings(max_examples=B.examples(20), deadline=None)
@given(seed=B.seeds, dtype=B.dtypes, s=st.lists(B.scales, min_size=4, max_size=4))
def test_whole_model_set_scales(march: str, seed: int, dtype: str, s: list[float]) -> None:
    m = _small_net(seed % 1000)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(seed)) * 2
    p, c = B.build(m, x, dict(zip(["quant", "c1", "add", "pool"], s, strict=True)),
                   B.qconfig(dtype, high_precision=True), march)
    assert c.c2.output_mode == "accumulator" and c.fc.output_mode == "high_precision"
    B.assert_floats(c(x), _small_net_reference(p, c, x.numpy(), dtype), "whole model")


@pytest.mark.parametrize("march,dtype", [("nash-e", "qint8"), ("nash-e", "qint16"),
                                         ("bernoulli2", "qint8"), ("bernoulli", "qint8")])
def test_whole_model_calibrated(march: str, dtype: str) -> None:
    """Scales from calibration on data (min/max observers; power-of-two on bernoulli)."""
    m = _small_net(3)
    gen = torch.Generator().manual_seed(11)
    batches = [torch.randn(4, 2, 6, 6, generator=gen) * 3 for _ in range(3)]
    with qk.set_march(march):
        p = qk.prepare(m, batches[0], qconfig=qk.QConfig(qk.QuantSpec(dtype)))
        p.eval()
        qk.set_fake_quantize(p, qk.FakeQuantState.CALIBRATION)
        with torch.no_grad():
            for xb in batches:
                p(xb)
        qk.set_fake_quantize(p, qk.FakeQuantState.VALIDATION)
        c = qk.convert(p)
    lo = min(float(xb.min()) for xb in batches)
    hi = max(float(xb.max()) for xb in batches)
    pow2 = march == "bernoulli"
    assert float(c.quant.out_scale) == R.scale_from_range(lo, hi, dtype, pow2=pow2)
    for mod in (c.c1, c.add, c.pool):
        s = float(mod.out_scale)
        assert s > 0 and (not pow2 or np.log2(s) == round(np.log2(s)))
    x = torch.randn(5, 2, 6, 6, generator=gen) * 3
    with torch.no_grad():
        B.assert_floats(c(x), _small_net_reference(p, c, x.numpy(), dtype), "calibrated")


def test_requant_in_batch_slices_gives_the_same_integers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large outputs are requantized a few samples at a time (memory); the integers must not
    depend on the slicing, in NCHW or NHWC-strided layouts."""
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-2**30, 2**30, (5, 7, 6, 6), generator=g, dtype=torch.int32)
    m, n = fp.multiplier(torch.rand(7, generator=g, dtype=torch.float64) * 1e-6)
    q_b = torch.randint(-2**20, 2**20, (7,), generator=g)
    plan = fp.requant_plan(m, n, q_b, 2**31)
    assert plan is not None
    for a in (acc, acc.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
        whole = fp.requant_f64(a, plan, -128, 127, "qint8", 1)
        monkeypatch.setattr(fp, "REQUANT_CHUNK", 50)  # 1 sample of 252 per slice, 5 slices
        sliced = fp.requant_f64(a, plan, -128, 127, "qint8", 1)
        monkeypatch.setattr(fp, "REQUANT_CHUNK", 1 << 20)
        assert torch.equal(whole, sliced)
        want = fp.requant_mn(a.to(torch.int64) + q_b.reshape(1, -1, 1, 1), m, n, 1).clamp(
            -128, 127)
        assert torch.equal(whole.to(torch.int64), want)
