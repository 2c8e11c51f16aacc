"""Bit-exactness of PReLU/LeakyReLU, Softmax, GELU, LayerNorm/LayerNorm2d and AvgPool2d with
per-position divisors (docs/fixed-point.md sections 10 and 14 to 17) against the NumPy
reference, and their error against the float op of the dequantized input (the documented
bound). Cases are built through the public workflow (tests/_bitexact.py)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qatkit as qk
from qatkit.quantization import registry
from tests import _bitexact as B
from tests._tv_import import import_torchvision
from tests.reference import npref as R

pytestmark = pytest.mark.filterwarnings("ignore::qatkit.base.errors.QatkitWarning")


def _one_op(op: nn.Module, shape: tuple, in_dtype: str, out_dtype: str, s_in: float,
            s_out: float, march: str = "nash-e") -> nn.Module:
    _, c = B.build(B.Chain(op), torch.randn(*shape), {"quant": s_in, "ops.0": s_out},
                   B.qconfig(out_dtype, {"quant": in_dtype}), march)
    return c


def _float_err(got: np.ndarray, y: np.ndarray, s_o: float, dtype: str) -> np.ndarray:
    """|q_o - y / s_o| where ``y / s_o`` is inside the output range (saturation excluded)."""
    lo, hi = R.QRANGE[dtype]
    t = y / s_o
    inside = (t > lo) & (t < hi)
    return np.abs(got - t)[inside]


# ------------------------------------------------------------------------------ §14


@settings(max_examples=B.examples(40), deadline=None)
@given(seed=B.seeds, in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales,
       s_out=B.scale_strategy(-12, 0), fill=B.fills, per_channel=st.booleans(),
       leaky=st.booleans(), shape=st.tuples(st.integers(1, 2), st.integers(1, 4),
                                            st.integers(1, 5)))
def test_prelu_leaky_relu(seed: int, in_dtype: str, out_dtype: str, s_in: float,
                          s_out: float, fill: str, per_channel: bool, leaky: bool,
                          shape: tuple) -> None:
    rng = np.random.default_rng(seed)
    c_ = shape[1]
    # slopes: ordinary, zero, negative, above one, and exact powers of two (requant ties)
    pool = np.array([0.25, 0.0, -0.5, 1.5, 0.01, 2.0**-7, 1.0], dtype=np.float32)
    slopes = np.where(rng.random(c_) < 0.5, rng.choice(pool, c_),
                      rng.uniform(-2, 2, c_)).astype(np.float32)
    if leaky:
        op: nn.Module = nn.LeakyReLU(float(slopes[0]))
        slope: Any = float(np.float32(op.negative_slope))
    else:
        op = nn.PReLU(c_ if per_channel else 1)
        B.set_param(op.weight, slopes if per_channel else slopes[:1])
        slope = slopes if per_channel else slopes[:1]
    q = B.ints(rng, shape, in_dtype, fill)
    c = _one_op(op, shape, in_dtype, out_dtype, s_in, s_out)
    got = B.run_ops(c, B.qtensor(q, s_in, in_dtype))
    want = R.prelu(q, s_in, slope, s_out, out_dtype)
    B.assert_ints(got, want, out_dtype, s_out, "prelu")
    x = q * s_in
    a = np.asarray(slope, dtype=np.float64).reshape(1, -1, 1) if not leaky else slope
    y = np.where(x >= 0, x, a * x)
    err = _float_err(B.as_np(got.q), y, s_out, out_dtype)
    assert (err <= 0.5 + np.abs(y / s_out)[..., None].max() * 2**-15 + 1e-9).all()


# ------------------------------------------------------------------------------ §15


@settings(max_examples=B.examples(40), deadline=None)
@given(seed=B.seeds, in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scale_strategy(-12, 0),
       fill=B.fills, shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       data=st.data())
def test_softmax(seed: int, in_dtype: str, out_dtype: str, s_in: float, fill: str,
                 shape: list, data: st.DataObject) -> None:
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    # the calibrated output scale of a probability: 1 / 127.5 (or finer)
    s_out = B.f32(data.draw(st.floats(0.3, 1.0)) / (127.5 if out_dtype == "qint8" else 32767.5))
    rng = np.random.default_rng(seed)
    q = B.ints(rng, shape, in_dtype, fill)
    c = _one_op(nn.Softmax(dim), tuple(shape), in_dtype, out_dtype, s_in, s_out)
    got = B.run_ops(c, B.qtensor(q, s_in, in_dtype))
    B.assert_ints(got, R.softmax(q, s_in, in_dtype, dim, s_out, out_dtype), out_dtype, s_out,
                  "softmax")
    p = torch.softmax(torch.from_numpy(q * s_in), dim).numpy()
    n = shape[dim]
    bound = 0.5 + ((1 + n) * 2**-16 + 2**-31) / s_out + 2**-15 / s_out
    assert (_float_err(B.as_np(got.q), p, s_out, out_dtype) <= bound).all()


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: implicit softmax dim
def test_softmax_without_dim_is_refused() -> None:
    """At prepare (QK106); as a head before the DeQuantStub, QK003 speaks at prepare and
    convert refuses it."""
    with qk.set_march("nash-e"), pytest.raises(qk.QatkitError, match=r"QK106.*dim"):
        qk.prepare(B.Chain(nn.Softmax(), nn.Linear(3, 3)), torch.randn(2, 3),
                   qconfig=qk.default_qat_qconfig())
    with pytest.raises(qk.QatkitError, match=r"QK106.*dim"):
        B.build(B.Chain(nn.Softmax()), torch.randn(2, 3), {"quant": 0.1, "ops.0": 0.01},
                B.qconfig())


# ------------------------------------------------------------------------------ §10 GELU


@settings(max_examples=B.examples(16), deadline=None)
@given(approx=st.sampled_from(["none", "tanh"]), in_dtype=B.dtypes, out_dtype=B.dtypes,
       s_in=B.scales, s_out=B.scale_strategy(-16, 0))
# s_o = 2 s_in: where GELU(x) ~ x every odd q is a tie that the last bit of tanh/erf near 1
# would decide (the spec's forms avoid it)
@example(approx="tanh", in_dtype="qint16", out_dtype="qint16", s_in=2.0**-10, s_out=2.0**-9)
@example(approx="none", in_dtype="qint16", out_dtype="qint16", s_in=2.0**-10, s_out=2.0**-9)
def test_gelu_tables(approx: str, in_dtype: str, out_dtype: str, s_in: float, s_out: float
                     ) -> None:
    """Every entry of the table (the input is every integer of the input dtype)."""
    lo, hi = R.QRANGE[in_dtype]
    q = np.arange(lo, hi + 1, dtype=np.int64).reshape(1, -1)
    kind = "gelu_tanh" if approx == "tanh" else "gelu"
    c = _one_op(nn.GELU(approximate=approx), (1, 4), in_dtype, out_dtype, s_in, s_out)
    got = B.run_ops(c, B.qtensor(q, s_in, in_dtype))
    B.assert_ints(got, R.apply_lut(q, kind, s_in, in_dtype, s_out, out_dtype), out_dtype,
                  s_out, kind)
    y = torch.nn.functional.gelu(torch.from_numpy(q * s_in), approximate=approx).numpy()
    assert (_float_err(B.as_np(got.q), y, s_out, out_dtype) <= 0.5 + 1e-6).all()


# ------------------------------------------------------------------------------ §16


def _ln_params(rng: np.random.Generator, shape: tuple, kind: str
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
    if kind == "none":
        return None, None
    w = (rng.uniform(-2, 2, shape) * rng.choice([1.0, 0.0, 0.01], shape)).astype(np.float32)
    b = None if kind == "no_bias" else (rng.normal(size=shape)).astype(np.float32)
    return w, b


@settings(max_examples=B.examples(40), deadline=None)
@given(seed=B.seeds, in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales,
       s_out=B.scale_strategy(-12, -2), fill=B.fills, n_dims=st.integers(1, 2),
       shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6)),
       affine=st.sampled_from(["affine", "affine", "none", "no_bias"]),
       eps=st.sampled_from([1e-5, 1e-6, 0.0, 0.1]))
def test_layer_norm(seed: int, in_dtype: str, out_dtype: str, s_in: float, s_out: float,
                    fill: str, n_dims: int, shape: tuple, affine: str, eps: float) -> None:
    rng = np.random.default_rng(seed)
    norm = shape[len(shape) - n_dims:]
    op = nn.LayerNorm(norm, eps=eps, elementwise_affine=affine != "none",
                      bias=affine == "affine")
    w, b = _ln_params(rng, norm, affine)
    B.set_param(op.weight, w)
    B.set_param(op.bias, b)
    q = B.ints(rng, shape, in_dtype, fill)
    c = _one_op(op, shape, in_dtype, out_dtype, s_in, s_out)
    got = B.run_ops(c, B.qtensor(q, s_in, in_dtype))
    want = R.layer_norm(q, s_in, in_dtype, n_dims, w, b, eps, s_out, out_dtype)
    B.assert_ints(got, want, out_dtype, s_out, "layer_norm")
    x = torch.from_numpy(q * s_in)
    y = torch.nn.functional.layer_norm(
        x, norm, None if w is None else torch.from_numpy(w).double(),
        None if b is None else torch.from_numpy(b).double(), eps).numpy()
    if eps == 0.0 and np.ptp(q.reshape(*q.shape[:len(shape) - n_dims], -1), -1).min() == 0:
        return  # 0 / 0 in float; the integer form gives the bias (documented)
    amp = np.abs(y / s_out).max(initial=0.0)
    bound = 0.5 + 2**-9 + amp * 2**-14 + 1e-6
    assert (_float_err(B.as_np(got.q), y, s_out, out_dtype) <= bound).all()


@pytest.fixture(scope="module")
def tv() -> Any:
    return import_torchvision()


@settings(max_examples=B.examples(15), deadline=None)
@given(seed=B.seeds, in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales,
       s_out=B.scale_strategy(-12, -2), fill=B.fills,
       shape=st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 3),
                       st.integers(1, 3)))
def test_layer_norm2d_channels_first(tv: Any, seed: int, in_dtype: str, out_dtype: str,
                                     s_in: float, s_out: float, fill: str, shape: tuple
                                     ) -> None:
    """torchvision's convnext LayerNorm2d (an nn.LayerNorm subclass normalising axis 1)."""
    from torchvision.models.convnext import LayerNorm2d
    rng = np.random.default_rng(seed)
    op = LayerNorm2d(shape[1], eps=1e-6)
    w, b = _ln_params(rng, (shape[1],), "affine")
    B.set_param(op.weight, w)
    B.set_param(op.bias, b)
    assert registry.kind_of(op) == "layer_norm2d"
    q = B.ints(rng, shape, in_dtype, fill)
    c = _one_op(op, shape, in_dtype, out_dtype, s_in, s_out)
    got = B.run_ops(c, B.qtensor(q, s_in, in_dtype))
    B.assert_ints(got, R.layer_norm(q, s_in, in_dtype, None, w, b, 1e-6, s_out, out_dtype,
                                    channels_first=True), out_dtype, s_out, "layer_norm2d")


def test_torchvision_convnext_block_pattern(tv: Any) -> None:
    """torchvision's CNBlock body (Permute, nn.LayerNorm over channels last, Linear, GELU,
    Linear, Permute) and its downsampling (LayerNorm2d, Conv2d) through the whole workflow;
    the fixed-point output stays within a few LSB of the fake-quant model."""
    from torchvision.models.convnext import LayerNorm2d
    from torchvision.ops.misc import Permute
    torch.manual_seed(0)
    body = [LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 16, 2, 2), Permute([0, 2, 3, 1]),
            nn.LayerNorm(16, eps=1e-6), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16),
            Permute([0, 3, 1, 2])]
    model = B.Chain(*body).eval()
    x = torch.randn(4, 8, 8, 8)
    with qk.set_march("nash-e"):
        p = qk.prepare(model, x[:1], qconfig=qk.default_qat_qconfig())
        p.eval()
        qk.set_fake_quantize(p, qk.FakeQuantState.CALIBRATION)
        p(x)
        p.train()
        qk.set_fake_quantize(p, qk.FakeQuantState.QAT)
        p(x).sum().backward()  # a QAT step's backward reaches the LayerNorm weights
        assert p.ops[0].op.weight.grad is not None
        p.eval()
        qk.set_fake_quantize(p, qk.FakeQuantState.VALIDATION)
        fake = p(x)
        c = qk.convert(p)
    got = c(x)
    s_o = float(c.ops[6].out_scale)
    assert (got - fake).abs().max() <= 6 * s_o


# ------------------------------------------------------------------------------ §17


@settings(max_examples=B.examples(50), deadline=None)
@given(data=st.data(), in_dtype=B.dtypes, out_dtype=B.dtypes, fill=B.fills, seed=B.seeds,
       s_in=B.scales, s_out=B.scales, ceil=st.booleans(), include_pad=st.booleans(),
       override=st.one_of(st.none(), st.integers(1, 20)))
def test_avg_pool2d_divisors(data: st.DataObject, in_dtype: str, out_dtype: str, fill: str,
                             seed: int, s_in: float, s_out: float, ceil: bool,
                             include_pad: bool, override: int | None) -> None:
    d = data.draw
    k = (d(st.integers(1, 4)), d(st.integers(1, 4)))
    stride = d(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    pad = (d(st.integers(0, k[0] // 2)), d(st.integers(0, k[1] // 2)))
    n, c_ = d(st.integers(1, 2)), d(st.integers(1, 2))
    h, w = d(st.integers(1, 7)), d(st.integers(1, 7))
    h, w = max(h, k[0] - 2 * pad[0]), max(w, k[1] - 2 * pad[1])
    q = B.ints(np.random.default_rng(seed), (n, c_, h, w), in_dtype, fill)
    op = nn.AvgPool2d(k, stride, pad, ceil_mode=ceil, count_include_pad=include_pad,
                      divisor_override=override)
    c = _one_op(op, q.shape, in_dtype, out_dtype, s_in, s_out)
    got = B.run_ops(c, B.qtensor(q, s_in, in_dtype))
    want = R.avg_pool2d_divisor(q, s_in, k, stride, pad, ceil, include_pad, override, s_out,
                                out_dtype)
    B.assert_ints(got, want, out_dtype, s_out, "avg_pool2d")
    y = op(torch.from_numpy(q * s_in)).numpy()  # PyTorch's own divisors, in float64
    amp = np.abs(y / s_out).max(initial=0.0)
    assert (_float_err(B.as_np(got.q), y, s_out, out_dtype) <= 0.5 + amp * 2**-15 + 1e-6).all()


# ------------------------------------------------------------------------------ registry


NEW_OPS = {"prelu": lambda: nn.PReLU(3), "leaky_relu": lambda: nn.LeakyReLU(0.2),
           "softmax": lambda: nn.Softmax(1), "gelu": nn.GELU,
           "layer_norm": lambda: nn.LayerNorm(5)}


@pytest.mark.parametrize("kind", sorted(NEW_OPS))
def test_new_ops_are_missing_on_the_old_cores(kind: str) -> None:
    """The rows say which marches lack each op; QK002 names it at prepare."""
    op = NEW_OPS[kind]()
    assert registry.kind_of(op) == kind
    for march in ("bernoulli", "bernoulli2"):
        assert kind in registry.unsupported_ops(march)
        with qk.set_march(march), pytest.raises(qk.QatkitError, match=rf"QK002.*{kind}"):
            qk.prepare(B.Chain(op), torch.randn(2, 3, 4, 5), qconfig=qk.default_qat_qconfig())
    assert kind not in registry.unsupported_ops("bayes")


def test_avg_pool2d_flags_are_accepted_everywhere() -> None:
    op = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
    with qk.set_march("bernoulli2"):
        p = qk.prepare(B.Chain(op), torch.randn(1, 2, 7, 7), qconfig=qk.default_qat_qconfig())
    assert type(p.ops[0]).__name__ == "QATOp"


def test_functional_call_sites_construct_the_same_modules() -> None:
    """A functional call site builds its modules from the op's parameters alone."""
    from qatkit.fixed_point import modules as fx
    s_in, s_o = torch.tensor(2.0**-4), torch.tensor(B.f32(1 / 127.5))
    q = torch.arange(-12, 12, dtype=torch.int8).reshape(2, 3, 4)
    x = qk.QTensor(q, s_in, "qint8") if hasattr(qk, "QTensor") else None
    if x is None:
        from qatkit.base.qtensor import QTensor
        x = QTensor(q, s_in, "qint8")
    sm = fx.QSoftmax(-1, s_o, "qint8")(x)
    want = R.softmax(q.numpy().astype(np.int64), 2.0**-4, "qint8", -1, B.f32(1 / 127.5), "qint8")
    assert np.array_equal(sm.q.numpy().astype(np.int64), want)
    w, b = torch.linspace(-1, 1, 4), torch.linspace(0, 1, 4)
    ln = fx.QLayerNorm((4,), w, b, 1e-5, torch.tensor(2.0**-5), "qint8")(x)
    want = R.layer_norm(q.numpy().astype(np.int64), 2.0**-4, "qint8", 1, w.numpy(), b.numpy(), 1e-5,
                        2.0**-5, "qint8")
    assert np.array_equal(ln.q.numpy().astype(np.int64), want)
    lr = fx.QPReLU(0.1, torch.tensor(2.0**-4), "qint8")(x)
    assert np.array_equal(lr.q.numpy().astype(np.int64),
                          R.prelu(q.numpy().astype(np.int64), 2.0**-4, 0.1, 2.0**-4, "qint8"))
    assert math.isfinite(float(ln.q.float().sum()))
