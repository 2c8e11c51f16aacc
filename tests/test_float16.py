"""float16 operators on nash-p/nash-h (spec section 19), bit-exact against the NumPy reference:
the float64 -> float16 rounding (ties, subnormals, the edge of the range), int <-> float16
transitions, elementwise ops (every finite float16 input for the activations), reductions,
pooling, softmax, layer norm, a GEMM's float16 output; a mixed int8/float16 model from prepare
to convert; the refusals (march, weights, a float16 -> integer edge without a QuantStub,
overflow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import qatkit as qk
from qatkit.base.errors import QatkitError
from qatkit.base.qtensor import QTensor
from qatkit.fixed_point.float16 import QFloat16Functional, QFloat16Op, f16
from qatkit.fixed_point.modules import QQuantStub
from qatkit.quantization import checkpoint
from tests.reference import npref as R

pytestmark = pytest.mark.filterwarnings("ignore::qatkit.base.errors.QatkitWarning")

F16 = qk.QConfig(qk.QuantSpec("float16"), qk.QuantSpec(per_channel=True))


def bits(a: np.ndarray | torch.Tensor) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    assert a.dtype == np.float16, a.dtype
    return a.view(np.uint16)


def same(got: torch.Tensor, want: np.ndarray) -> None:
    assert got.dtype == torch.float16
    assert np.array_equal(bits(got), bits(want)), (got, want)


def agree(run, want) -> None:  # type: ignore[no-untyped-def]
    """``run()`` (the model) gives ``want()`` (the reference), or both refuse an overflow."""
    try:
        expected = want()
    except R.Refused:  # beyond float16: refused by both, never inf or saturated
        with pytest.raises(QatkitError, match="QK103"):
            run()
        return
    same(run(), expected)


def all_finite_f16() -> np.ndarray:
    v = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    return v[np.isfinite(v)]


# ---- float64 -> float16: one rounding --------------------------------------------------------

def _near_ties(rng: np.random.Generator, n: int) -> np.ndarray:
    """float64 values at, just above and just below float16 midpoints (normal and subnormal),
    and around the largest float16."""
    h = rng.integers(0, 0x7BFF, n).astype(np.uint16).view(np.float16)
    up = np.nextafter(h, np.float16(np.inf))
    mid = (h.astype(np.float64) + up.astype(np.float64)) / 2
    eps = np.abs(mid) * 2.0**-45 + 2.0**-80
    v = np.concatenate([mid, mid + eps, mid - eps, [65504.0, 65519.999, 2.0**-24, 2.0**-25,
                                                    2.0**-25 * 1.0000001, 2.0**-26, 0.0]])
    return v * rng.choice([-1.0, 1.0], v.size)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_rounding_to_float16_is_one_ieee_rounding(seed: int) -> None:
    v = _near_ties(np.random.default_rng(seed), 2000)
    same(f16(torch.from_numpy(v)), R.f16(v))
    # what PyTorch's own float64 -> float16 cast gets wrong (it rounds through float32)
    assert f16(torch.tensor([1 + 2.0**-11 + 2.0**-40], dtype=torch.float64)).item() == \
        1 + 2.0**-10


def test_rounding_by_definition() -> None:
    """A few values whose float16 is known by hand: ties to even, the subnormal grid, the edge
    of the range."""
    cases = {1 + 2.0**-11: 1.0, 1 + 3 * 2.0**-11: 1 + 2.0**-9, 2.0**-25: 0.0,
             3 * 2.0**-25: 2.0**-23, 65519.99: 65504.0, -(2.0**-24): -(2.0**-24)}
    for x, want in cases.items():
        assert f16(torch.tensor([x], dtype=torch.float64)).item() == want, x
    assert torch.isinf(f16(torch.tensor([65520.0], dtype=torch.float64))).all()
    with pytest.raises(R.Refused):
        R.f16([65520.0])


# ---- transitions ---------------------------------------------------------------------------

dtypes = st.sampled_from(["qint8", "qint16"])
scales = st.sampled_from([2.0**-7, 0.0123, 1.7, 3.0e-6, 2.0**-20, 1.0, 1.999])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dtype=dtypes, s=scales)
def test_int_to_float16(seed: int, dtype: str, s: float) -> None:
    lo, hi = R.QRANGE[dtype]
    q = np.random.default_rng(seed).integers(lo, hi + 1, (3, 40))
    q[0, :4] = [lo, hi, 0, 1]
    s32 = np.float32(s)
    op = QFloat16Op(nn.Identity(), "identity")
    x = QTensor(torch.from_numpy(q).to(torch.int16), torch.tensor(s32), dtype)
    agree(lambda: op(x), lambda: R.dequantize_f16(q, s32))  # 32767 * 1.999: refused


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dtype=dtypes, s=scales)
def test_float16_to_int(seed: int, dtype: str, s: float) -> None:
    v = np.random.default_rng(seed).choice(all_finite_f16(), 300)
    stub = QQuantStub(torch.tensor(s), dtype)
    got = stub(torch.from_numpy(v.copy()))
    assert np.array_equal(got.q.numpy().astype(np.int64), R.quantize_f16(v, np.float32(s), dtype))


# ---- elementwise ops -------------------------------------------------------------------------

UNARY = {"sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "silu": nn.SiLU(),
         "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(), "gelu": nn.GELU(),
         "gelu_tanh": nn.GELU(approximate="tanh"), "relu6": nn.ReLU6()}


@pytest.mark.parametrize("kind", sorted(UNARY))
def test_activation_on_every_float16(kind: str) -> None:
    v = all_finite_f16()
    same(QFloat16Op(UNARY[kind], kind)(torch.from_numpy(v.copy())), R.f16_unary(kind, v))


def test_leaky_relu_on_every_float16() -> None:
    v = all_finite_f16()
    same(QFloat16Op(nn.LeakyReLU(0.1), "leaky_relu")(torch.from_numpy(v.copy())),
         R.f16_leaky_relu(v, 0.1))
    pr = nn.PReLU(3)
    with torch.no_grad():
        pr.weight.copy_(torch.tensor([0.25, -0.3, 1e-3]))
    x = np.random.default_rng(0).choice(v, (2, 3, 50))
    same(QFloat16Op(pr, "prelu")(torch.from_numpy(x)), R.f16_leaky_relu(
        x, pr.weight.detach().numpy().astype(np.float64)))


def _f16_values(rng: np.random.Generator, shape: tuple[int, ...], fill: str) -> np.ndarray:
    if fill == "any":  # every finite float16, extremes and subnormals included
        return rng.choice(all_finite_f16(), shape)
    if fill == "subnormal":
        return (rng.integers(-1023, 1024, shape) * 2.0**-24).astype(np.float16)
    return rng.standard_normal(shape).astype(np.float16)


fills = st.sampled_from(["normal", "any", "subnormal"])


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), op=st.sampled_from(
    ["add", "sub", "mul", "maximum", "minimum"]), fa=fills, fb=fills)
def test_binary_ops(seed: int, op: str, fa: str, fb: str) -> None:
    rng = np.random.default_rng(seed)
    a, b = _f16_values(rng, (4, 33), fa), _f16_values(rng, (4, 33), fb)
    f = QFloat16Functional(None)
    agree(lambda: getattr(f, op)(torch.from_numpy(a), torch.from_numpy(b)),
          lambda: R.f16_binary(op, a, b))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), c=st.sampled_from([0.1, -3.0, 1e-7, 1 / 3, 2.5e4]),
       op=st.sampled_from(["add_scalar", "mul_scalar"]))
def test_scalar_ops(seed: int, c: float, op: str) -> None:
    a = _f16_values(np.random.default_rng(seed), (50,), "normal")
    agree(lambda: getattr(QFloat16Functional(None), op)(torch.from_numpy(a), c),
          lambda: R.f16_binary("add" if op == "add_scalar" else "mul", a,
                               np.full_like(a, R.f16_const(c))))


def test_mixed_int_and_float16_operands() -> None:
    """An int8 operand enters a float16 add dequantized to float16 first (section 19)."""
    rng = np.random.default_rng(3)
    q = rng.integers(-128, 128, (2, 16))
    a = _f16_values(rng, (2, 16), "normal")
    s = np.float32(0.0371)
    got = QFloat16Functional("relu").add(torch.from_numpy(a),
                                         QTensor(torch.from_numpy(q).to(torch.int8),
                                                 torch.tensor(s), "qint8"))
    want = np.maximum(R.f16_binary("add", a, R.dequantize_f16(q, s)), np.float16(0))
    same(got, want)


def test_cat_moves_float16_values() -> None:
    rng = np.random.default_rng(4)
    a, b = _f16_values(rng, (2, 3), "any"), _f16_values(rng, (2, 5), "any")
    same(QFloat16Functional(None).cat([torch.from_numpy(a), torch.from_numpy(b)], 1),
         np.concatenate([a, b], 1))


# ---- reductions, pooling, softmax, layer norm ---------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), op=st.sampled_from(["sum", "mean"]), fill=fills,
       dim=st.sampled_from([1, -1, (1, 2)]), keepdim=st.booleans())
def test_reductions(seed: int, op: str, fill: str, dim: int | tuple, keepdim: bool) -> None:
    a = _f16_values(np.random.default_rng(seed), (2, 7, 9), fill)
    agree(lambda: getattr(QFloat16Functional(None), op)(torch.from_numpy(a), dim, keepdim),
          lambda: R.f16_reduce(op, a, dim, keepdim))


def test_reduction_beyond_the_exact_count_is_refused() -> None:
    a = torch.zeros(1, 8192, dtype=torch.float16)
    with pytest.raises(QatkitError, match=r"QK106.*8191"):
        QFloat16Functional(None).mean(a, 1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.sampled_from([2, 3, (2, 3)]),
       p=st.sampled_from([0, 1]), fill=st.sampled_from(["normal", "subnormal"]))
def test_avg_pool(seed: int, k: int | tuple, p: int, fill: str) -> None:
    x = _f16_values(np.random.default_rng(seed), (2, 3, 7, 8), fill)
    kk = k if isinstance(k, tuple) else (k, k)
    if p * 2 > min(kk):
        p = 0
    got = QFloat16Op(nn.AvgPool2d(k, padding=p), "avg_pool2d")(torch.from_numpy(x))
    same(got, R.f16_avg_pool2d(x, k, None, p))
    same(QFloat16Op(nn.AdaptiveAvgPool2d(1), "adaptive_avg_pool2d")(torch.from_numpy(x)),
         R.f16_reduce("mean", x, (2, 3), keepdim=True))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dim=st.sampled_from([1, -1]),
       spread=st.sampled_from([1.0, 30.0, 3000.0]))
def test_softmax(seed: int, dim: int, spread: float) -> None:
    x = (np.random.default_rng(seed).standard_normal((3, 6, 10)) * spread).astype(np.float16)
    same(QFloat16Op(nn.Softmax(dim), "softmax")(torch.from_numpy(x)), R.f16_softmax(x, dim))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), affine=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-6, 0.1]), fill=fills)
def test_layer_norm(seed: int, affine: bool, eps: float, fill: str) -> None:
    rng = np.random.default_rng(seed)
    x = _f16_values(rng, (3, 4, 12), fill)
    ln = nn.LayerNorm(12, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ln.weight.copy_(torch.from_numpy(rng.standard_normal(12).astype(np.float32)))
            ln.bias.copy_(torch.from_numpy(rng.standard_normal(12).astype(np.float32)))
    w = ln.weight.detach().numpy() if affine else None
    b = ln.bias.detach().numpy() if affine else None
    agree(lambda: QFloat16Op(ln, "layer_norm")(torch.from_numpy(x)),
          lambda: R.f16_layer_norm(x, 1, w, b, eps))


# ---- a mixed int8 / float16 model, prepare -> calibrate -> QAT step -> convert -------------

class Mixed(nn.Module):
    """int8 linear with float16 output -> float16 SiLU, add, LayerNorm -> QuantStub -> int8
    linear (high-precision output)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = qk.QuantStub()
        self.fc1 = nn.Linear(12, 16)
        self.act = nn.SiLU()
        self.norm = nn.LayerNorm(16)
        self.requant = qk.QuantStub()
        self.fc2 = nn.Linear(16, 5)
        self.dequant = qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.quant(x))
        y = self.norm(h + self.act(h))
        return self.dequant(self.fc2(self.requant(y)))


def _mixed_mapping() -> qk.QConfigMapping:
    m = qk.QConfigMapping(qk.default_qat_qconfig())
    for name in ("fc1", "act", "add_0", "norm"):
        m.set_module_name(name, F16)
    return m


def _reference(p: nn.Module, c: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The converted model's output from the spec alone (npref), with the prepared model's
    float weights and the converted model's scales."""
    s0 = np.float32(c.quant.out_scale)
    q0 = R.quantize(x.numpy(), s0, "qint8")
    w1, b1 = p.fc1.weight.detach().numpy(), p.fc1.bias.detach().numpy()
    s_w1 = c.fc1.weight_scale.numpy()
    acc1 = R.linear(q0, s0, w1, b1, s_w1, 1.0, "qint32", mode="accumulator")
    h = R.gemm_f16(acc1, R.accumulator_output_scale(b1, s0, s_w1), -1)
    y = R.f16_binary("add", h, R.f16_unary("silu", h))
    z = R.f16_layer_norm(y, 1, p.norm.op.weight.detach().numpy(),
                         p.norm.op.bias.detach().numpy(), p.norm.op.eps)
    s2 = np.float32(c.requant.out_scale)
    q2 = R.quantize_f16(z, s2, "qint8")
    w2, b2 = p.fc2.weight.detach().numpy(), p.fc2.bias.detach().numpy()
    s_w2 = c.fc2.weight_scale.numpy()
    acc2 = R.linear(q2, s2, w2, b2, s_w2, 1.0, "qint32", mode="accumulator")
    return R.dequantize(acc2, R.accumulator_output_scale(b2, s2, s_w2), axis=-1)


def test_mixed_model_end_to_end_bit_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Mixed().eval()
    data = [torch.randn(8, 12) for _ in range(3)]
    with qk.set_march("nash-p"):
        p = qk.prepare(model, data[0], _mixed_mapping())
        qk.calibrate(p, data)
        p.train()  # one QAT step: gradients flow through the float16 rounding
        opt = torch.optim.SGD(p.parameters(), lr=0.01)
        loss = p(data[0]).square().mean()
        loss.backward()
        assert p.fc1.weight.grad is not None and p.fc1.weight.grad.abs().sum() > 0
        opt.step()
        p.eval()
        c = qk.convert(p)
        s = str(qk.summary(c, data[0]))
        assert "float16" in s
        for x in data:
            got = c(x)
            assert got.dtype == torch.float32
            want = _reference(p, c, x)
            assert np.array_equal(got.numpy(), want), np.abs(got.numpy() - want).max()
            assert torch.allclose(got, p(x), atol=0.05)  # QAT and fixed point agree closely
        # checkpoints: the prepared and the converted model load back to the same integers
        p2 = qk.prepare(model, data[0], _mixed_mapping())
        p2.load_state_dict(p.state_dict())
        qk.calibrate(p2, data[:1])
        c2 = qk.convert(p2)
        checkpoint.save(c, tmp_path / "fixed.pt")  # through torch.load(weights_only=True)
        checkpoint.load(c2, tmp_path / "fixed.pt")
        assert torch.equal(c2(data[1]), c(data[1]))
        from qatkit.analysis.compare import compare
        layers = {lc.name: lc for lc in compare(p, c, data[0]).ranking()}
        assert layers["norm"].dtype == "float16" and layers["norm"].max_error_lsb is None
        assert not qk.doctor.check(c, data[0]).findings  # the doctor reads float16 ops
        pytest.importorskip("onnx")
        with pytest.raises(QatkitError, match=r"QK106.*fc1.*float16"):
            qk.export_onnx(c, data[0])


def test_gemm_float16_output_with_relu() -> None:
    """A conv with float16 output and a fused ReLU (section 19): accumulator * scale, one
    rounding, then ReLU."""
    torch.manual_seed(1)
    seq = nn.Sequential(qk.QuantStub(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                        qk.DeQuantStub()).eval()
    x = torch.randn(2, 3, 6, 6)
    with qk.set_march("nash-h"):
        mapping = qk.QConfigMapping(qk.default_calibration_qconfig()).set_module_name("1", F16)
        p = qk.prepare(seq, x, mapping)
        qk.calibrate(p, [x])
        c = qk.convert(p)
        conv, s0 = c[1], np.float32(c[0].out_scale)
        q0 = R.quantize(x.numpy(), s0, "qint8")
        w, b = p[1].weight.detach().numpy(), p[1].bias.detach().numpy()
        acc = R.conv2d(q0, s0, w, b, conv.weight_scale.numpy(), 1.0, "qint32", padding=1,
                       mode="accumulator")
        want = R.gemm_f16(acc, R.accumulator_output_scale(b, s0, conv.weight_scale.numpy()),
                          1, "relu")
        same(conv(c[0](x)), want)


# ---- refusals ----------------------------------------------------------------------------

def test_float16_refused_on_a_march_without_it() -> None:
    with qk.set_march("nash-e"), pytest.raises(QatkitError, match="QK002") as e:
        qk.prepare(Mixed().eval(), torch.randn(2, 12), _mixed_mapping())
    assert "nash-e" in str(e.value) and "fc1" in str(e.value)


def test_float16_weights_refused() -> None:
    q = qk.QConfig(qk.QuantSpec("qint8"), qk.QuantSpec("float16", per_channel=True))
    with qk.set_march("nash-p"), pytest.raises(QatkitError, match=r"QK002.*weights"):
        qk.prepare(Mixed().eval(), torch.randn(2, 12), q)


class NoRequant(Mixed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.quant(x))
        return self.dequant(self.fc2(self.act(h)))  # float16 SiLU straight into an int8 GEMM


def test_float16_into_a_gemm_needs_a_quant_stub() -> None:
    with qk.set_march("nash-p"), pytest.raises(QatkitError, match="QK102") as e:
        qk.prepare(NoRequant().eval(), torch.randn(2, 12), _mixed_mapping())
    assert "'fc2'" in str(e.value) and "'act'" in str(e.value) and "QuantStub" in str(e.value)


def test_overflow_refused_in_qat_and_fixed_point() -> None:
    model = Mixed().eval()
    with torch.no_grad():
        model.fc1.weight.mul_(1e4)  # fc1's float16 output beyond 65504 on large inputs
    x = torch.randn(4, 12)
    with qk.set_march("nash-p"):
        p = qk.prepare(model, x * 1e-3, _mixed_mapping())
        with pytest.raises(QatkitError, match=r"QK103.*'fc1'.*float16"):
            qk.calibrate(p, [x * 100])
        qk.calibrate(p, [x * 1e-3])
        c = qk.convert(p)
        with pytest.raises(QatkitError, match=r"QK103.*fc1"):
            c(x * 100)  # within the int8 input range, beyond float16 after fc1


class Entry(nn.Module):
    """float16 from the QuantStub on: max pooling, ReLU, a torch.sigmoid call site, nearest
    resizing and a flatten on float16 values."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = qk.QuantStub()
        self.pool = nn.MaxPool2d(2)
        self.dequant = qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(torch.relu(self.pool(self.quant(x))))
        return self.dequant(nn.functional.interpolate(y, scale_factor=2).flatten(1))


def test_float16_entry_and_value_moving_ops() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 6) * 4
    with qk.set_march("nash-p"):
        p = qk.prepare(Entry().eval(), x, qk.QConfig(qk.QuantSpec("float16")))
        qk.calibrate(p, [x])
        c = qk.convert(p)
        got = c(x)
    v = R.f16(x.numpy().astype(np.float64))
    v = v.reshape(2, 3, 2, 2, 3, 2).max(axis=(3, 5))
    v = R.f16_unary("sigmoid", np.maximum(v, np.float16(0)))
    want = v.repeat(2, axis=2).repeat(2, axis=3).reshape(2, -1).astype(np.float32)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
    assert torch.equal(p(x), got)  # QAT rounds each float16 op's output the same way here
