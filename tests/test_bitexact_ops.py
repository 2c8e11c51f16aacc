"""Bit-exactness of the ops without weights (docs/fixed-point.md sections 6 to 10): ReLU, ReLU6,
Hardtanh, max/average pooling, reshapes, Upsample, the lookup tables, Identity, Dropout and the
FloatFunctional methods, with int8 and int16 activations. Conv/linear and whole models are in
tests/test_bitexact.py; tests/_bitexact.py builds the cases through the public workflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import qatkit as qk
from tests import _bitexact as B
from tests.reference import npref as R

# QK104 warns about input scales far apart (drawn on purpose here).
pytestmark = pytest.mark.filterwarnings("ignore::qatkit.base.errors.QatkitWarning")


def _one_op(op: nn.Module, shape: tuple, in_dtype: str, out_dtype: str, s_in: float,
            s_out: float | None) -> nn.Module:
    """Convert QuantStub -> op -> DeQuantStub; ``s_out=None``: the op keeps its input scale."""
    scales = {"quant": s_in} if s_out is None else {"quant": s_in, "ops.0": s_out}
    _, c = B.build(B.Chain(op), torch.randn(*shape), scales,
                   B.qconfig(out_dtype, {"quant": in_dtype}))
    return c


def _nchw(draw: st.DrawFn, max_hw: int = 6, min_hw: int = 1) -> tuple[int, int, int, int]:
    return (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(min_hw, max_hw)),
            draw(st.integers(min_hw, max_hw)))


# ------------------------------------------------------------------------------ §7 clamps


@settings(max_examples=B.examples(200), deadline=None)
@given(seed=B.seeds, in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales, s_out=B.scales,
       fill=B.fills, kind=st.sampled_from(["relu", "relu6", "hardtanh", "hardtanh", "identity",
                                            "dropout"]),
       lo=st.floats(-20, 0), width=st.floats(0.001, 40),
       edge=st.one_of(st.none(), st.tuples(st.integers(-40, 0), st.integers(1, 40),
                                            st.sampled_from([0.25, 0.5, 0.75]))))
def test_relu_relu6_hardtanh_identity_dropout(seed: int, in_dtype: str, out_dtype: str,
                                              s_in: float, s_out: float, fill: str, kind: str,
                                              lo: float, width: float, edge: tuple | None
                                              ) -> None:
    """``edge``: Hardtanh bounds at ``(k + frac) * s_in``, where their rounding decides."""
    rng = np.random.default_rng(seed)
    shape = (4, 16)
    q = B.ints(rng, shape, in_dtype, fill)
    if edge is not None:
        lo, width = (edge[0] - edge[2]) * s_in, (edge[1] - edge[0] + 2 * edge[2]) * s_in
        q = np.clip(q, edge[0] - 3, edge[1] + 3)  # values around both bounds
    if kind in ("relu", "identity", "dropout"):  # integers kept, scale kept
        op = {"relu": nn.ReLU(), "identity": nn.Identity(), "dropout": nn.Dropout(0.5)}[kind]
        c = _one_op(op, shape, in_dtype, out_dtype, s_in, None)
        want = R.relu(q) if kind == "relu" else q
        B.assert_ints(B.run_ops(c, B.qtensor(q, s_in, in_dtype)), want, in_dtype, s_in, kind)
        return
    lo_hi = (0.0, 6.0) if kind == "relu6" else (lo, lo + width)
    op = nn.ReLU6() if kind == "relu6" else nn.Hardtanh(*lo_hi)
    c = _one_op(op, shape, in_dtype, out_dtype, s_in, s_out)
    want = R.clamp_act(q, s_in, *lo_hi, s_out, out_dtype)
    B.assert_ints(B.run_ops(c, B.qtensor(q, s_in, in_dtype)), want, out_dtype, s_out, kind)


# ------------------------------------------------------------------------------ §9 pooling


@settings(max_examples=B.examples(120), deadline=None)
@given(data=st.data(), dtype=B.dtypes, fill=B.fills, seed=B.seeds, s=B.scales)
def test_max_pool2d(data: st.DataObject, dtype: str, fill: str, seed: int, s: float) -> None:
    d = data.draw
    k = (d(st.integers(1, 3)), d(st.integers(1, 3)))
    stride = (d(st.integers(1, 3)), d(st.integers(1, 3)))
    pad = (d(st.integers(0, k[0] // 2)), d(st.integers(0, k[1] // 2)))
    dil = (d(st.integers(1, 2)), d(st.integers(1, 2)))
    ceil = d(st.booleans())
    n, c_, h, w = _nchw(d)
    # every window then holds an input position (a window of padding only gives -inf in float)
    h, w = max(h, dil[0] * (k[0] - 1) + 1), max(w, dil[1] * (k[1] - 1) + 1)
    q = B.ints(np.random.default_rng(seed), (n, c_, h, w), dtype, fill)
    c = _one_op(nn.MaxPool2d(k, stride, pad, dil, ceil_mode=ceil), q.shape, dtype, dtype, s,
                None)
    want = R.max_pool2d(q, k, stride, pad, dil, ceil)
    B.assert_ints(B.run_ops(c, B.qtensor(q, s, dtype)), want, dtype, s, "max_pool2d")


@settings(max_examples=B.examples(120), deadline=None)
@given(data=st.data(), in_dtype=B.dtypes, out_dtype=B.dtypes, fill=B.fills, seed=B.seeds,
       s_in=B.scales, s_out=B.scales)
def test_avg_pool2d(data: st.DataObject, in_dtype: str, out_dtype: str, fill: str, seed: int,
                    s_in: float, s_out: float) -> None:
    d = data.draw
    k = (d(st.integers(1, 4)), d(st.integers(1, 4)))
    stride = d(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    pad = (d(st.integers(0, k[0] // 2)), d(st.integers(0, k[1] // 2)))
    n, c_, h, w = _nchw(d)
    h, w = max(h, k[0] - 2 * pad[0]), max(w, k[1] - 2 * pad[1])
    q = B.ints(np.random.default_rng(seed), (n, c_, h, w), in_dtype, fill)
    c = _one_op(nn.AvgPool2d(k, stride, pad), q.shape, in_dtype, out_dtype, s_in, s_out)
    want = R.avg_pool2d(q, s_in, k, stride, pad, s_out, out_dtype)
    B.assert_ints(B.run_ops(c, B.qtensor(q, s_in, in_dtype)), want, out_dtype, s_out, "avg")


@settings(max_examples=B.examples(80), deadline=None)
@given(oh=st.integers(1, 3), ow=st.integers(1, 3), kh=st.integers(1, 4), kw=st.integers(1, 4),
       in_dtype=B.dtypes, out_dtype=B.dtypes, fill=B.fills, seed=B.seeds, s_in=B.scales,
       s_out=B.scales, as_int=st.booleans())
def test_adaptive_avg_pool2d(oh: int, ow: int, kh: int, kw: int, in_dtype: str, out_dtype: str,
                             fill: str, seed: int, s_in: float, s_out: float, as_int: bool
                             ) -> None:
    if as_int:
        ow = oh
    q = B.ints(np.random.default_rng(seed), (2, 3, oh * kh, ow * kw), in_dtype, fill)
    size: Any = oh if as_int else (oh, ow)
    c = _one_op(nn.AdaptiveAvgPool2d(size), q.shape, in_dtype, out_dtype, s_in, s_out)
    want = R.adaptive_avg_pool2d(q, s_in, (oh, ow), s_out, out_dtype)
    B.assert_ints(B.run_ops(c, B.qtensor(q, s_in, in_dtype)), want, out_dtype, s_out, "adaptive")


# ------------------------------------------------------------------------------ §7 reshapes


class Shapes(nn.Module):
    """Flatten module, view, reshape, permute, transpose, unsqueeze/squeeze and nearest
    Upsample on quantized values."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.up = nn.Upsample(scale_factor=factor, mode="nearest")
        self.flat = nn.Flatten(1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = self.up(self.quant(x))
        f = x.shape[-1] // w
        x = self.flat(x)  # [n, c*h*f*w*f]
        x = x.view(n, c, h * f, w * f).permute(0, 2, 3, 1)  # NHWC
        x = x.reshape(n, -1, c).transpose(1, 2)  # [n, c, h*w*f*f]
        x = torch.flatten(x.unsqueeze(1), 2).squeeze(1)
        return self.dequant(self.relu(x))


@settings(max_examples=B.examples(60), deadline=None)
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4),
                       st.integers(1, 4)), factor=st.integers(1, 3), dtype=B.dtypes,
       s=B.scales, seed=B.seeds, fill=B.fills)
def test_reshapes_and_nearest_upsample(shape: tuple, factor: int, dtype: str, s: float,
                                       seed: int, fill: str) -> None:
    rng = np.random.default_rng(seed)
    x = (B.ints(rng, shape, dtype, fill) * s).astype(np.float32)  # whole model on float input
    _, c = B.build(Shapes(factor), torch.from_numpy(x), {"quant": s}, B.qconfig(dtype))
    q = R.quantize(x, s, dtype)
    n, ch, h, w = shape
    up = R.upsample_nearest(q, factor)
    want = up.reshape(n, ch, h * factor, w * factor).transpose(0, 2, 3, 1)
    want = R.relu(want.reshape(n, -1, ch).transpose(0, 2, 1).reshape(n, -1))
    with B.capture_dequant_input(c) as got:
        y = c(torch.from_numpy(x))
    B.assert_ints(got[0], want, dtype, s, "reshapes")
    B.assert_floats(y, R.dequantize(want, s), "reshapes, dequantized")


# ------------------------------------------------------------------------------ §9 bilinear


@settings(max_examples=B.examples(200), deadline=None)
@given(data=st.data(), in_dtype=B.dtypes, out_dtype=B.dtypes, fill=B.fills, seed=B.seeds,
       s_in=B.scales, s_out=B.scales, align=st.booleans())
def test_upsample_bilinear(data: st.DataObject, in_dtype: str, out_dtype: str, fill: str,
                           seed: int, s_in: float, s_out: float, align: bool) -> None:
    d = data.draw
    h, w = d(st.integers(1, 6)), d(st.integers(1, 6))
    if d(st.booleans()):  # integer scale factor: the output size is exactly h * f
        f = d(st.integers(1, 4))
        op, out_hw = nn.Upsample(scale_factor=f, mode="bilinear", align_corners=align), (h * f,
                                                                                          w * f)
    else:  # any size, up or down
        out_hw = (d(st.integers(1, 13)), d(st.integers(1, 13)))
        op = nn.Upsample(size=out_hw, mode="bilinear", align_corners=align)
    q = B.ints(np.random.default_rng(seed), (1, 2, h, w), in_dtype, fill)
    c = _one_op(op, q.shape, in_dtype, out_dtype, s_in, s_out)
    want = R.upsample_bilinear(q, s_in, out_hw, align, s_out, out_dtype)
    B.assert_ints(B.run_ops(c, B.qtensor(q, s_in, in_dtype)), want, out_dtype, s_out, "bilinear")


def _pytorch_taps(n_in: int, n_out: int, scale_factor: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Section 9 taps by PyTorch's rule for a given scale factor, align_corners=False:
    src = (dst + 0.5) * (1 / scale_factor) - 0.5, clamped at 0 (float64); an axis whose size
    does not change is copied (src = dst)."""
    scale = 1.0 / scale_factor if n_out != n_in else 1.0
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    return i0, np.minimum(i0 + 1, n_in - 1), R.round_half_even((src - i0) * 256)


@settings(max_examples=B.examples(60), deadline=None)
@given(h=st.integers(1, 7), w=st.integers(1, 7), sf=st.tuples(
    st.floats(0.3, 3.5).map(lambda f: round(f, 2)), st.floats(0.3, 3.5).map(lambda f: round(f, 2))),
    seed=B.seeds, s=B.scales, fill=B.fills)
def test_upsample_bilinear_fractional_scale_factor(h: int, w: int, sf: tuple, seed: int,
                                                   s: float, fill: str) -> None:
    """A non-integer scale_factor: PyTorch maps output positions back with 1 / scale_factor,
    which differs from in_size / out_size when in_size * scale_factor is not an integer. The
    fixed-point result is checked bit for bit with taps by that rule, and against PyTorch's
    float64 bilinear resize of the same integers (within the Q8 weights' rounding)."""
    oh, ow = int(h * sf[0]), int(w * sf[1])
    if oh < 1 or ow < 1:
        return
    q = B.ints(np.random.default_rng(seed), (1, 2, h, w), "qint8", fill)
    op = nn.Upsample(scale_factor=sf, mode="bilinear", align_corners=False)
    got = B.run_ops(_one_op(op, q.shape, "qint8", "qint8", s, s), B.qtensor(q, s, "qint8"))
    (y0, y1, wy1), (x0, x1, wx1) = _pytorch_taps(h, oh, sf[0]), _pytorch_taps(w, ow, sf[1])
    wy0, wx0 = 256 - wy1, 256 - wx1
    acc = ((q[..., y0, :] * wy0[:, None] + q[..., y1, :] * wy1[:, None])[..., x0] * wx0
           + (q[..., y0, :] * wy0[:, None] + q[..., y1, :] * wy1[:, None])[..., x1] * wx1)
    want = R.sat(R.requant(acc, s / 65536 / s), "qint8")
    B.assert_ints(got, want, "qint8", s, f"bilinear x{sf}")
    ref = torch.nn.functional.interpolate(torch.from_numpy(q).double(), scale_factor=sf,
                                          mode="bilinear", align_corners=False).numpy()
    assert np.abs(B.as_np(got.q) - ref).max() <= 1.5, "not PyTorch's source positions"


# ------------------------------------------------------------------------------ §10 tables

LUTS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "silu": nn.SiLU, "hardswish": nn.Hardswish,
        "hardsigmoid": nn.Hardsigmoid}


@settings(max_examples=B.examples(80), deadline=None)
@given(kind=st.sampled_from(sorted(LUTS)), in_dtype=B.dtypes, out_dtype=B.dtypes,
       s_in=B.scales, s_out=B.scale_strategy(-16, 0))
def test_lookup_tables(kind: str, in_dtype: str, out_dtype: str, s_in: float, s_out: float
                       ) -> None:
    """Every entry of the table: the input is every integer of the input dtype."""
    lo, hi = R.QRANGE[in_dtype]
    q = np.arange(lo, hi + 1, dtype=np.int64).reshape(1, 1, -1)
    c = _one_op(LUTS[kind](), (1, 1, 4), in_dtype, out_dtype, s_in, s_out)
    want = R.apply_lut(q, kind, s_in, in_dtype, s_out, out_dtype)
    B.assert_ints(B.run_ops(c, B.qtensor(q, s_in, in_dtype)), want, out_dtype, s_out, kind)


# ------------------------------------------------------------------------------ §6, §8 functional


def _run_functional(model: B.Functional, qs: list[np.ndarray], ss: list[float],
                    in_dtypes: list[str], out_dtype: str, s_out: float) -> Any:
    scales = {f"q.{i}": s for i, s in enumerate(ss)}
    scales["ff"] = s_out
    _, c = B.build(model, tuple(torch.randn(q.shape) for q in qs), scales,
                   B.qconfig(out_dtype, {f"q.{i}": dt for i, dt in enumerate(in_dtypes)}))
    return c.call(c.ff, [B.qtensor(q, s, dt) for q, s, dt in zip(qs, ss, in_dtypes)])


@st.composite
def _operands(draw: st.DrawFn, n: int, broadcast: bool = True) -> dict:
    shape = draw(st.sampled_from([(5,), (2, 3), (4, 16), (2, 3, 2, 2)]))
    rng = np.random.default_rng(draw(B.seeds))
    dts = [draw(B.dtypes) for _ in range(n)]
    shapes = [shape] * n
    if broadcast and n == 2 and len(shape) == 4 and draw(st.booleans()):
        shapes[1] = (1, shape[1], 1, 1)
    qs = [B.ints(rng, sh, dt, draw(B.fills)) for sh, dt in zip(shapes, dts)]
    return dict(qs=qs, dts=dts, ss=[draw(B.scales) for _ in range(n)],
                out_dtype=draw(B.dtypes), s_out=draw(B.scales))


@settings(max_examples=B.examples(300), deadline=None)
@given(op=st.sampled_from(["add", "add_relu", "sub", "mul", "maximum", "minimum"]),
       a=_operands(2), fused_relu=st.booleans())
def test_binary(op: str, a: dict, fused_relu: bool) -> None:
    qs, ss, dts, od, so = a["qs"], a["ss"], a["dts"], a["out_dtype"], a["s_out"]
    fused_relu = fused_relu and op == "add"

    class WithRelu(B.Functional):  # add followed by a ReLU module
        def __init__(self) -> None:
            super().__init__("add", 2)
            self.relu = nn.ReLU()

        def call(self, ff: nn.Module, xs: list) -> Any:
            return self.relu(ff.add(*xs))

    model = WithRelu() if fused_relu else B.Functional(op, 2)
    got = _run_functional(model, qs, ss, dts, od, so)
    if op in ("add", "add_relu", "sub"):
        want = R.add(qs[0], ss[0], qs[1], ss[1], so, od, relu=op == "add_relu" or fused_relu,
                     sub=op == "sub")
    else:
        want = getattr(R, op)(qs[0], ss[0], qs[1], ss[1], so, od)
    B.assert_ints(got, want, od, so, op + (" + fused relu" if fused_relu else ""))


@settings(max_examples=B.examples(200), deadline=None)
@given(op=st.sampled_from(["add_scalar", "mul_scalar"]), a=_operands(1),
       c=st.one_of(st.floats(-100, 100), st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e6, -1e6])),
       edge=st.one_of(st.none(), st.tuples(st.integers(-3, 3), st.sampled_from(
           [0.25, 0.5, 0.75]))))
def test_scalar(op: str, a: dict, c: float, edge: tuple | None) -> None:
    """``edge``: add_scalar's constant at ``(256 t + 127 + frac)`` units of ``s_o / 256``, where
    the rounding of ``b_i`` decides the output for inputs that are 0."""
    qs, ss, dts, od, so = a["qs"], a["ss"], a["dts"], a["out_dtype"], a["s_out"]
    if edge is not None and op == "add_scalar":
        c = (256 * edge[0] + 127 + edge[1]) * (so / 256)
        qs = [np.where(np.arange(qs[0].size).reshape(qs[0].shape) % 2 == 0, 0, qs[0])]
    got = _run_functional(B.Functional(op, 1, c), qs, ss, dts, od, so)
    want = getattr(R, op)(qs[0], ss[0], c, so, od)
    B.assert_ints(got, want, od, so, f"{op}({c})")


@settings(max_examples=B.examples(150), deadline=None)
@given(op=st.sampled_from(["cat", "stack"]), n=st.integers(1, 3), data=st.data())
def test_cat_stack(op: str, n: int, data: st.DataObject) -> None:
    d = data.draw
    base = d(st.sampled_from([(4,), (2, 3), (1, 2, 3, 2)]))
    dim = d(st.integers(-len(base) - (op == "stack"), len(base) - 1 + (op == "stack")))
    rng = np.random.default_rng(d(B.seeds))
    dts = [d(B.dtypes) for _ in range(n)]
    shapes = []
    for _ in range(n):
        sh = list(base)
        if op == "cat":
            sh[dim] = d(st.integers(1, 3))
        shapes.append(tuple(sh))
    qs = [B.ints(rng, sh, dt, d(B.fills)) for sh, dt in zip(shapes, dts)]
    ss = [d(B.scales) for _ in range(n)]
    od, so = d(B.dtypes), d(B.scales)
    got = _run_functional(B.Functional(op, n, as_list=True, dim=dim), qs, ss, dts, od, so)
    want = getattr(R, op)(qs, ss, dim, so, od)
    B.assert_ints(got, want, od, so, f"{op} dim={dim}")


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 3, 1), (3, 1, 2), (1, 2, 3), (2, 3, 1),
                                   (1, 5, 4), (4, 1, 1)])
@pytest.mark.parametrize("views", [(False, False), (True, False), (False, True), (True, True)])
def test_int_mm_operands_with_size_one_dims(m: int, k: int, n: int, views: tuple) -> None:
    """torch._int_mm on CPU misreads operands whose size-1 dimension has an unusual stride
    (``is_contiguous()`` holds for them): int8 matmul and Linear (K = 1 or O = 1) with
    transposed views."""
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    qa, qb = B.ints(rng, (m, k), "qint8", "random"), B.ints(rng, (k, n), "qint8", "random")
    _, c = B.build(B.Functional("matmul", 2), (torch.randn(m, k), torch.randn(k, n)),
                   {"q.0": 0.5, "q.1": 0.25, "ff": 2.0**-5}, B.qconfig("qint8"))
    got = c.ff.matmul(_qt_layout(qa, 0.5, "qint8", views[0]),
                      _qt_layout(qb, 0.25, "qint8", views[1]))
    B.assert_ints(got, R.matmul(qa, 0.5, qb, 0.25, 2.0**-5, "qint8"), "qint8", what="matmul")
    lin = nn.Linear(k, n)  # weight [n, k]: its transpose is the [k, n] int_mm operand
    w, b = B.float_weights(rng, (n, k), "random"), B.float_bias(rng, n, "normal")
    B.set_param(lin.weight, w)
    B.set_param(lin.bias, b)
    _, c = B.build(B.Chain(lin), torch.randn(m, k), {"quant": 0.5},
                   B.qconfig("qint8", high_precision=True))
    got = c.ops[0](_qt_layout(qa, 0.5, "qint8", views[0]))
    s_w = c.ops[0].weight_scale.numpy()
    want = R.linear(qa, 0.5, w, b, s_w, 1.0, "qint32", mode="accumulator")
    B.assert_ints(got, want, "qint32", what="linear")


def _qt_layout(q: np.ndarray, s: float, dtype: str, transposed: bool) -> qk.QTensor:
    """A QTensor of ``q``; ``transposed``: a transposed view of a contiguous q^T (for a [1, k]
    or [m, 1] matrix a "contiguous" view whose size-1 dimension has stride 1)."""
    if not transposed:
        return B.qtensor(q, s, dtype)
    return B.qtensor(np.ascontiguousarray(np.swapaxes(q, -1, -2)), s, dtype).transpose(-1, -2)


@settings(max_examples=B.examples(150), deadline=None)
@given(seed=B.seeds, lead=st.sampled_from([(), (), (2,), (2, 2)]), m=st.integers(1, 4),
       k=st.integers(1, 40), n=st.integers(1, 4), dts=st.tuples(B.dtypes, B.dtypes),
       fills=st.tuples(B.fills, B.fills), ss=st.tuples(B.scales, B.scales), od=B.dtypes,
       so=B.scale_strategy(-8, 8), views=st.tuples(st.booleans(), st.booleans()),
       b_lead=st.booleans())
def test_matmul(seed: int, lead: tuple, m: int, k: int, n: int, dts: tuple, fills: tuple,
                ss: tuple, od: str, so: float, views: tuple, b_lead: bool) -> None:
    """2-D int8 x int8 uses torch._int_mm, everything else float64: both exact, whatever the
    operands' strides; a 2-D b broadcasts over a's leading dimensions."""
    rng = np.random.default_rng(seed)
    qa = B.ints(rng, (*lead, m, k), dts[0], fills[0])
    qb = B.ints(rng, (*(lead if b_lead else ()), k, n), dts[1], fills[1])
    model = B.Functional("matmul", 2)
    scales = {"q.0": ss[0], "q.1": ss[1], "ff": so}
    _, c = B.build(model, (torch.randn(qa.shape), torch.randn(qb.shape)), scales,
                   B.qconfig(od, {"q.0": dts[0], "q.1": dts[1]}))
    got = c.ff.matmul(_qt_layout(qa, ss[0], dts[0], views[0]),
                      _qt_layout(qb, ss[1], dts[1], views[1]))
    want = R.matmul(qa, ss[0], qb, ss[1], so, od)
    B.assert_ints(got, want, od, so, f"matmul, transposed views {views}")


@settings(max_examples=B.examples(150), deadline=None)
@given(op=st.sampled_from(["sum", "mean"]), a=_operands(1, broadcast=False), data=st.data(),
       keepdim=st.booleans())
def test_sum_mean(op: str, a: dict, data: st.DataObject, keepdim: bool) -> None:
    qs, ss, dts, od, so = a["qs"], a["ss"], a["dts"], a["out_dtype"], a["s_out"]
    nd = qs[0].ndim
    dim: Any = data.draw(st.one_of(
        st.integers(-nd, nd - 1),
        st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True).map(tuple)))
    got = _run_functional(B.Functional(op, 1, dim, keepdim=keepdim), qs, ss, dts, od, so)
    ref = R.sum_ if op == "sum" else R.mean
    want = ref(qs[0], ss[0], dim, keepdim, so, od)
    B.assert_ints(got, want, od, so, f"{op} dim={dim} keepdim={keepdim}")


def test_adaptive_avg_pool_to_a_multiple_of_the_input_is_an_exact_copy() -> None:
    """VGG at small inputs: AdaptiveAvgPool2d((7, 7)) of a 1x1 (or 2x3 -> 6x6) map."""
    from qatkit.base.qtensor import QTensor
    from qatkit.fixed_point.modules import QAvgPool2d
    from tests.reference import npref as R
    gen = torch.Generator().manual_seed(0)
    for hw, out in (((1, 1), (7, 7)), ((2, 3), (6, 6))):
        q = torch.randint(-128, 128, (2, 3, *hw), generator=gen, dtype=torch.int8)
        s_in, s_o = torch.tensor(0.05), torch.tensor(0.06)
        pool = QAvgPool2d(None, None, 0, s_o, "qint8", adaptive_out=out)
        got = pool(QTensor(q, s_in, "qint8")).q
        kh, kw = out[0] // hw[0], out[1] // hw[1]
        rep = q.to(torch.int64).repeat_interleave(kh, 2).repeat_interleave(kw, 3)
        want = R.sat(R.requant(rep.numpy(), np.float64(np.float32(0.05)) /
                               np.float64(np.float32(0.06))), "qint8")
        assert np.array_equal(got.numpy(), want)
        ref = torch.nn.functional.adaptive_avg_pool2d(q.double() * 0.05, out)
        assert torch.allclose(got.double() * float(s_o), ref, atol=float(s_o) / 2 + 1e-9)
