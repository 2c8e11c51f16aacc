"""int16 weights (spec section 5): conv, linear and transposed conv bit-exact against the NumPy
reference, full-range int16 weights and activations included; accumulators past int32 held
exactly in int64; the 2^47 bound refused; refused on marches without int16 weights (QK002);
converted checkpoints keep their int16 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import qatkit as qk
from qatkit.fixed_point import kernels as fp
from tests import _bitexact as B
from tests.reference import npref as R
from tests.test_bitexact import _conv_setup, conv_cases

pytestmark = pytest.mark.filterwarnings("ignore::qatkit.base.errors.QatkitWarning")


def w16_qconfig(out_dtype: str, in_dtype: str, hp: bool = False) -> qk.QConfigMapping:
    """Every op: ``out_dtype`` outputs, int16 per-channel weights; the QuantStub ``in_dtype``."""
    w16 = qk.QuantSpec("qint16", per_channel=True)
    return (qk.QConfigMapping(qk.QConfig(qk.QuantSpec(out_dtype), w16, hp))
            .set_module_name("quant", qk.QConfig(qk.QuantSpec(in_dtype), None, hp)))


def w16_scales(w: np.ndarray, b: np.ndarray | None = None, channel_axis: int = 0
               ) -> np.ndarray:
    """int16 weight scales per output channel (section 2; an all-zero channel takes its range
    from its bias, section 5)."""
    return R.weight_scales(np.moveaxis(np.asarray(w, dtype=np.float32), channel_axis, 0), b,
                           dtype="qint16")


@settings(max_examples=B.examples(80), deadline=None)
@given(case=conv_cases(), in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales,
       s_out=B.scales, act=st.sampled_from([None, "relu", "hp"]))
def test_conv2d_int16_weights(case: dict, in_dtype: str, out_dtype: str, s_in: float,
                              s_out: float, act: str | None) -> None:
    conv, w, q, b = _conv_setup(case, in_dtype)
    hp = act == "hp"
    act = None if hp else act
    ops = [conv] + ([nn.ReLU()] if act else [])
    scales = {"quant": s_in} if hp else {"quant": s_in, "ops.0": s_out}
    _, c = B.build(B.Chain(*ops), torch.randn(case["n"], case["cin"], *case["hw"]), scales,
                   w16_qconfig(out_dtype, in_dtype, hp))
    qc = c.ops[0]
    s_w = qc.weight_scale.numpy()
    assert np.array_equal(s_w, w16_scales(w, b)), "int16 weight scales (section 2)"
    assert qc.weight.dtype == torch.int16
    assert np.array_equal(B.as_np(qc.weight), R.quantize_weight(w, s_w, "qint16"))
    got, want = B.agree(lambda: B.run_ops(c, B.qtensor(q, s_in, in_dtype)), lambda: R.conv2d(
        q, s_in, w, b, s_w, s_out, "qint32" if hp else out_dtype, case["stride"],
        case["padding"], case["dilation"], case["groups"], activation=act,
        mode="accumulator" if hp else "quantized", w_dtype="qint16"))
    if want is None:  # refused by the spec and by the model (an int32 output beyond int32)
        return
    if hp:
        B.assert_ints(got, want, "qint32", R.accumulator_output_scale(b, s_in, s_w),
                      "conv2d w16 hp")
    else:
        B.assert_ints(got, want, out_dtype, s_out, f"conv2d w16 {act}")


@settings(max_examples=B.examples(60), deadline=None)
@given(seed=B.seeds, k=st.integers(1, 40), o=st.integers(1, 5), in_dtype=B.dtypes,
       out_dtype=B.dtypes, s_in=B.scales, s_out=B.scales, wfill=B.wfills, xfill=B.fills,
       bias=st.sampled_from(["none", "normal", "huge"]))
def test_linear_int16_weights(seed: int, k: int, o: int, in_dtype: str, out_dtype: str,
                              s_in: float, s_out: float, wfill: str, xfill: str, bias: str
                              ) -> None:
    rng = np.random.default_rng(seed)
    lin = nn.Linear(k, o, bias=bias != "none")
    w, b = B.float_weights(rng, (o, k), wfill), B.float_bias(rng, o, bias)
    B.set_param(lin.weight, w)
    B.set_param(lin.bias, b)
    q = B.ints(rng, (3, k), in_dtype, xfill)
    _, c = B.build(B.Chain(lin), torch.randn(3, k), {"quant": s_in, "ops.0": s_out},
                   w16_qconfig(out_dtype, in_dtype))
    s_w = c.ops[0].weight_scale.numpy()
    assert np.array_equal(s_w, w16_scales(w, b))
    got, want = B.agree(lambda: B.run_ops(c, B.qtensor(q, s_in, in_dtype)),
                        lambda: R.linear(q, s_in, w, b, s_w, s_out, out_dtype, w_dtype="qint16"))
    if want is None:  # refused by the spec and by the model (an int32 output beyond int32)
        return
    B.assert_ints(got, want, out_dtype, s_out, "linear w16")


@settings(max_examples=B.examples(30), deadline=None)
@given(seed=B.seeds, in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales, s_out=B.scales,
       groups=st.integers(1, 2), wfill=B.wfills, xfill=B.fills)
def test_conv_transpose2d_int16_weights(seed: int, in_dtype: str, out_dtype: str, s_in: float,
                                        s_out: float, groups: int, wfill: str, xfill: str
                                        ) -> None:
    rng = np.random.default_rng(seed)
    ct = nn.ConvTranspose2d(2 * groups, 2 * groups, 3, 2, 1, 1, groups)
    w = B.float_weights(rng, ct.weight.shape, wfill, channel_axis=1)
    B.set_param(ct.weight, w)
    B.set_param(ct.bias, B.float_bias(rng, 2 * groups, "normal"))
    q = B.ints(rng, (1, 2 * groups, 3, 4), in_dtype, xfill)
    _, c = B.build(B.Chain(ct), torch.randn(1, 2 * groups, 3, 4),
                   {"quant": s_in, "ops.0": s_out}, w16_qconfig(out_dtype, in_dtype))
    s_w = c.ops[0].weight_scale.numpy()
    got, want = B.agree(lambda: B.run_ops(c, B.qtensor(q, s_in, in_dtype)),
                        lambda: R.conv_transpose2d(q, s_in, w, ct.bias.detach().numpy(), s_w,
                                                   s_out, out_dtype, 2, 1, 1, 1, groups,
                                                   w_dtype="qint16"))
    if want is None:  # refused by the spec and by the model (an int32 output beyond int32)
        return
    B.assert_ints(got, want, out_dtype, s_out, "conv_transpose2d w16")


@pytest.mark.parametrize("xfill", ["extremes", "max", "min"])
def test_full_range_int16_accumulator_past_int32_is_exact(xfill: str) -> None:
    """64 x 3x3 taps of full-range int16 x int16: |acc| up to 576 * 2^30 ~ 2^39, far past int32
    (and past float32's 2^24), held exactly (float64 sums, int64 requantization)."""
    rng = np.random.default_rng(1)
    conv = nn.Conv2d(64, 3, 3, padding=1)
    w = B.float_weights(rng, conv.weight.shape, "extremes")
    B.set_param(conv.weight, w)
    q = B.ints(rng, (1, 64, 5, 5), "qint16", xfill)
    s_in, s_out = 2.0**-10, B.f32(2.0**9.3)
    _, c = B.build(B.Chain(conv), torch.randn(1, 64, 5, 5), {"quant": s_in, "ops.0": s_out},
                   w16_qconfig("qint16", "qint16"))
    qc = c.ops[0]
    assert int(qc.weight.abs().max()) >= 32767
    assert fp.acc_bound(qc.weight, "qint16") > 2**38
    assert fp.conv_method(qc.weight, "qint16", 1) == "float64"
    got = B.run_ops(c, B.qtensor(q, s_in, "qint16"))
    s_w = qc.weight_scale.numpy()
    acc = R.conv2d_acc(q, R.quantize_weight(w, s_w, "qint16"), None, padding=1)
    assert np.abs(acc).max() > 2**31  # the accumulator really leaves int32
    want = R.conv2d(q, s_in, w, conv.bias.detach().numpy(), s_w, s_out, "qint16", padding=1,
                    w_dtype="qint16")
    B.assert_ints(got, want, "qint16", s_out, "conv2d full-range int16")


def test_accumulator_bound_2_47_is_refused_for_int16_inputs_only() -> None:
    """Linear(140000 -> 1) with full-range int16 weights: int16 inputs can sum past 2^47
    (refused, QK106); int8 inputs cannot (exact)."""
    k = 140_000
    lin = nn.Linear(k, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.5)
    x = torch.randn(1, k)
    _, c = B.build(B.Chain(lin), x, {"quant": 2.0**-7, "ops.0": 1024.0},
                   w16_qconfig("qint16", "qint16"))
    q16 = np.full((1, k), -32768, dtype=np.int64)
    with pytest.raises(qk.QatkitError, match=r"\[QK106\].*2\^47"):
        B.run_ops(c, B.qtensor(q16, 2.0**-7, "qint16"))
    q8 = np.full((1, k), -128, dtype=np.int64)
    got = B.run_ops(c, B.qtensor(q8, 2.0**-7, "qint8"))
    s_w = c.ops[0].weight_scale.numpy()
    want = R.linear(q8, 2.0**-7, lin.weight.detach().numpy(), None, s_w, 1024.0, "qint16",
                    w_dtype="qint16")
    B.assert_ints(got, want, "qint16", 1024.0, "linear 140000 taps, int8 inputs")


@pytest.mark.parametrize("march", ["bayes", "nash-b-lite", "bernoulli2"])
def test_int16_weights_refused_where_the_march_lacks_them(march: str) -> None:
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(qk.QatkitError, match=rf"\[QK002\].*weight dtype qint16.*would fail to "
                                             rf"compile for {march}"):
        B.build(B.Chain(conv), torch.randn(1, 3, 8, 8), {}, w16_qconfig("qint8", "qint8"),
                march=march)


def test_converted_checkpoint_keeps_int16_weights(tmp_path) -> None:
    rng = np.random.default_rng(0)
    conv = nn.Conv2d(3, 4, 3)
    B.set_param(conv.weight, B.float_weights(rng, conv.weight.shape, "random"))
    x = torch.randn(1, 3, 8, 8)
    scales = {"quant": 2.0**-5, "ops.0": 2.0**-4}
    _, c16 = B.build(B.Chain(conv), x, scales, w16_qconfig("qint8", "qint8"))
    qk.checkpoint.save(c16, tmp_path / "w16.pt")
    _, fresh = B.build(B.Chain(nn.Conv2d(3, 4, 3)), x, scales, w16_qconfig("qint8", "qint8"))
    qk.checkpoint.load(fresh, tmp_path / "w16.pt")
    assert fresh.ops[0].weight.dtype == torch.int16
    assert torch.equal(fresh.ops[0].weight, c16.ops[0].weight)
    assert torch.equal(fresh(x), c16(x))
    _, c8 = B.build(B.Chain(nn.Conv2d(3, 4, 3)), x, scales, B.qconfig("qint8"))
    with pytest.raises(qk.QatkitError, match=r"\[QK000\].*torch.int16 but the model holds "
                                             r"torch.int8"):
        qk.checkpoint.load(c8, tmp_path / "w16.pt")


def test_qat_with_int16_weights_trains_and_converts_to_the_weights_it_used() -> None:
    """QAT fake-quantizes weights on the int16 grid (|q_w| up to 32767, not 127), and
    convert quantizes the final weights to exactly that grid."""
    torch.manual_seed(0)
    model = B.Chain(nn.Conv2d(2, 3, 3), nn.ReLU()).train()
    x = torch.randn(8, 2, 6, 6)
    with qk.set_march("nash-e"):
        qat = qk.prepare(model.eval(), x[:2], qconfig=qk.default_qat_qconfig(
            weight_dtype="qint16"))
        qat.train()
        qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
        opt = torch.optim.SGD(qat.parameters(), lr=0.01)
        for _ in range(2):
            opt.zero_grad()
            qat(x).square().mean().backward()
            opt.step()
        qat.eval()
        qk.set_fake_quantize(qat, qk.FakeQuantState.VALIDATION)
        conv = qat.ops[0]
        wq = conv.weight_fake_quant(conv.weight).detach()
        fixed = qk.convert(qat)
    qc = fixed.ops[0]
    assert qc.weight.dtype == torch.int16
    s_w = qc.weight_scale.reshape(-1, 1, 1, 1)
    assert torch.equal(qc.weight.double() * s_w.double(), (wq.double() / s_w.double()).round()
                       * s_w.double())
    assert len(torch.unique(qc.weight[0])) > 16 and int(qc.weight.abs().max()) > 127
