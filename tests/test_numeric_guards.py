"""Numbers the fixed-point model cannot hold are handled exactly or refused, never clipped
silently (docs/fixed-point.md section 5).

- A channel whose weights are all zero (pruned, BN gamma = 0) takes its weight scale from its
  bias: the digits demo net with 8 of conv1's 32 channels pruned keeps its accuracy in fixed
  point (with the old 2^-40 floor the pruned channels' biases saturated: ~81 %).
- A bias beyond int32 at ``s_in * s_w`` is held exactly (docs/fixed-point.md section 5); an
  int32 (high-precision / accumulator) output beyond int32 is refused with QK105 naming the
  module.
- Property tests over extremes (zero channels, tiny and huge scales, int16 inputs, huge
  kernels): the fixed-point result equals the NumPy reference and is within the documented
  error of the fake-quant model, or both refuse.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import qatkit as qk
from qatkit.demo import recipe
from tests import _bitexact as B
from tests.reference import npref as R

pytestmark = pytest.mark.filterwarnings("ignore::qatkit.base.errors.QatkitWarning")

PRUNED = 8


@pytest.fixture(scope="module")
def pruned_digits() -> dict:
    """The demo net trained on digits, then 8 of conv1's 32 channels pruned (weights zeroed,
    no fine-tuning: bn1 keeps its statistics, so each folded channel is a large bias alone;
    the float model loses accuracy, which is beside the point: the fixed-point model must
    track the fake-quant model)."""
    torch.manual_seed(0)
    split = recipe.load("digits")
    net = recipe.DemoNet(split.num_classes)
    recipe.train(net, split, 8, lr=3e-3, seed=0, quiet=True)
    pruned = torch.arange(PRUNED)
    with torch.no_grad():
        net.conv1.weight[pruned] = 0.0
    return {"net": net, "split": split, "pruned": pruned}


def test_pruned_channels_keep_their_bias_in_fixed_point(pruned_digits: dict) -> None:
    net, split = pruned_digits["net"], pruned_digits["split"]
    float_acc = recipe.accuracy(net, split.x_test, split.y_test)
    with qk.set_march("nash-e"):
        calib = qk.prepare(net, recipe.centered(split.x_train[:2]),
                           qconfig=qk.default_calibration_qconfig())
        qk.calibrate(calib, recipe.calibration_batches(split))
        fq_acc = recipe.accuracy(calib, split.x_test, split.y_test)
        fixed = qk.convert(calib)
    conv1 = fixed.get_submodule("conv1")
    pruned = pruned_digits["pruned"]
    assert (conv1.weight[pruned] == 0).all() and conv1.bias[pruned].abs().min() > 0
    s_w = conv1.weight_scale.numpy()
    fixed_acc = recipe.accuracy(fixed, split.x_test, split.y_test)
    print(f"pruned digits: float {float_acc:.4f}, fake quant {fq_acc:.4f}, fixed {fixed_acc:.4f}")
    # measured: float 75.6 %, fake quant 74.7 %, fixed point 74.4 % (63.8 % with the 2^-40
    # floor, which saturated the pruned channels' biases)
    assert float_acc > 0.7, float_acc
    assert abs(fixed_acc - fq_acc) <= 0.015, (float_acc, fq_acc, fixed_acc)
    # the pruned channels' scales come from their biases, not the 2^-40 floor
    assert s_w[pruned.numpy()].min() > 2.0**-30


# ------------------------------------------------------------------------------ refusals


def _linear_chain(w: np.ndarray, b: np.ndarray | None, s_in: float, s_out: float | None,
                  in_dtype: str = "qint8", out_dtype: str = "qint8") -> tuple:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    B.set_param(lin.weight, w)
    B.set_param(lin.bias, b)
    hp = s_out is None
    scales = {"quant": s_in} if hp else {"quant": s_in, "ops.0": s_out}
    return B.build(B.Chain(lin), torch.randn(2, w.shape[1]), scales,
                   B.qconfig(out_dtype, {"quant": in_dtype}, high_precision=hp))


@pytest.mark.parametrize("hp", [False, True], ids=["quantized", "high-precision"])
def test_bias_beyond_int32_is_held_exactly(hp: bool) -> None:
    """Tiny weights next to a large bias: 100 / (2^-7 * 1e-6 / 127.5) is about 1.6e12, far
    beyond int32. Clipping it gave an output 99 % off; it was then refused (QK105); now the
    quantized output adds it in the requantization and the int32 output is shifted right
    (section 5), exactly as the reference computes."""
    w = np.full((2, 4), 1e-6, dtype=np.float32)
    b = np.array([100.0, 0.5], dtype=np.float32)
    s_in = 2.0**-7
    _, c = _linear_chain(w, b, s_in, None if hp else 1.0)
    s_w = c.ops[0].weight_scale.numpy()
    with pytest.raises(R.Refused):  # not as an int32 bias tensor (what QDQ formats hold)
        R.quantize_bias(b, np.float32(s_in), s_w)
    q = np.array([[64, 64, 64, 64], [-128, 127, 0, 3]])
    got = B.run_ops(c, B.qtensor(q, s_in, "qint8"))
    want = R.linear(q, s_in, w, b, s_w, 1.0, "qint32" if hp else "qint8",
                    mode="accumulator" if hp else "quantized")
    if hp:
        B.assert_ints(got, want, "qint32", R.accumulator_output_scale(b, s_in, s_w))
        assert int(c.ops[0]._prep(B.qtensor(q, s_in, "qint8"))["wide"]["m"][0]) == 2**14
    else:
        B.assert_ints(got, want, "qint8", 1.0)
    out = c(torch.full((1, 4), 0.5))
    assert torch.allclose(out, torch.tensor([[100.0, 0.5]]), atol=0.5 if not hp else 1e-6)


def test_bias_beyond_int32_at_an_absurd_multiplier_is_refused_naming_the_module() -> None:
    """Where even the exact form cannot hold it (the layer's own part could pass 2^59 at a
    huge multiplier), QK105 names the layer, the channel and what to check."""
    w = np.full((1, 4), 1e-6, dtype=np.float32)
    w[0, 0] = 1.0  # q_w of 127 at s_w = 1 / 127.5: one large weight, three zero ones
    b = np.array([1e6], dtype=np.float32)
    _, c = _linear_chain(w, b, 2.0**-40, 2.0**-126 * 2**10, in_dtype="qint16")
    with pytest.raises(qk.QatkitError, match=r"QK105.*QLinear 'ops\.0'.*output channel 0.*"
                       r"beyond int32") as err:
        c(torch.full((1, 4), 0.0))
    assert "Fix:" in str(err.value)


def test_int16_high_precision_output_beyond_int32_is_refused() -> None:
    """An int16 input at a small scale feeding a high-precision int32 output: float says 32768
    (1024 taps of 32 * 1), the int32 accumulator would need 32767 * 127 * 1024 > 2^31 and
    saturating it gave about half the value. Refused with QK105; an input that fits runs."""
    k = 1024
    w = np.ones((1, k), dtype=np.float32)
    _, c = _linear_chain(w, None, 2.0**-10, None, in_dtype="qint16", out_dtype="qint16")
    x = torch.full((1, k), 32.0)
    with pytest.raises(qk.QatkitError, match=r"QK105.*QLinear 'ops\.0'.*int32 output"):
        c(x)
    small = c(torch.full((1, k), 1.0))  # 1024 * 1024 * 127 < 2^31: exact
    assert float(small) == pytest.approx(1024 * 127 / 127.5, rel=1e-4)  # q_w = 127


def test_zero_channel_high_precision_output_keeps_its_bias() -> None:
    """An all-zero channel's high-precision output is its bias (it was the saturated 2^31 *
    s_in * 2^-40, i.e. about 0)."""
    w = np.zeros((2, 3), dtype=np.float32)
    w[1] = 0.25
    b = np.array([0.75, -0.5], dtype=np.float32)
    _, c = _linear_chain(w, b, 2.0**-6, None)
    out = c(torch.zeros(1, 3))
    assert torch.allclose(out, torch.tensor([[0.75, -0.5]]), atol=2.0**-6 * 0.01)


# ------------------------------------------------------------------------------ properties


def _extreme_weights(rng: np.random.Generator, shape: tuple, kind: str) -> np.ndarray:
    mag = {"tiny": 1e-12, "normal": 1.0, "huge": 1e4}.get(kind, 1.0)
    w = rng.uniform(-1, 1, size=shape) * mag
    if kind == "zero_channels":
        w[::2] = 0.0
    if kind == "all_zero":
        w[:] = 0.0
    return w.astype(np.float32)


def _extreme_bias(rng: np.random.Generator, n: int, kind: str) -> np.ndarray | None:
    if kind == "none":
        return None
    mag = {"tiny": 1e-9, "normal": 1.0, "huge": 1e7}[kind]
    return (rng.normal(size=n) * mag).astype(np.float32)


def _fake_quant_output(prepared: nn.Module, x: torch.Tensor) -> torch.Tensor:
    prepared.eval()
    qk.set_fake_quantize(prepared, qk.FakeQuantState.VALIDATION)
    with torch.no_grad():
        return prepared(x)


@settings(max_examples=B.examples(80), deadline=None)
@given(seed=B.seeds, k=st.sampled_from([1, 3, 40, 300, 20_000]), o=st.integers(1, 4),
       in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scale_strategy(-30, 10),
       s_out=B.scale_strategy(-30, 10), hp=st.booleans(), xfill=B.fills,
       wkind=st.sampled_from(["tiny", "normal", "huge", "zero_channels", "all_zero"]),
       bkind=st.sampled_from(["none", "tiny", "normal", "huge"]))
def test_linear_extremes_exact_or_refused(seed: int, k: int, o: int, in_dtype: str,
                                          out_dtype: str, s_in: float, s_out: float, hp: bool,
                                          xfill: str, wkind: str, bkind: str) -> None:
    """Fixed point == NumPy reference and within the documented error of fake quant
    (docs/fixed-point.md section 5), or both the reference and the model refuse (QK105)."""
    rng = np.random.default_rng(seed)
    w, b = _extreme_weights(rng, (o, k), wkind), _extreme_bias(rng, o, bkind)
    prepared, c = _linear_chain(w, b, s_in, None if hp else s_out, in_dtype, out_dtype)
    s_w = c.ops[0].weight_scale.numpy()
    assert np.array_equal(s_w, B.weight_scales_from_range(w, b))
    q = B.ints(rng, (2, k), in_dtype, xfill)
    got, want = B.agree(lambda: B.run_ops(c, B.qtensor(q, s_in, in_dtype)), lambda: R.linear(
        q, s_in, w, b, s_w, s_out, "qint32" if hp else out_dtype,
        mode="accumulator" if hp else "quantized"))
    if want is None:
        return
    B.assert_ints(got, want, "qint32" if hp else out_dtype)
    x = torch.from_numpy((q * np.float64(s_in)).astype(np.float32))
    y = _fake_quant_output(prepared, x).double()
    # float32's own error in the fake-quant sum: taps * 2^-24 * sum|x * w| (+ the bias)
    w_fq = prepared.ops[0].weight_fake_quant(prepared.ops[0].weight).detach().double()
    bias = torch.zeros(o, dtype=torch.float64) if b is None else torch.from_numpy(b).double()
    e32 = (k + 2) * 2.0**-24 * (x.double().abs() @ w_fq.abs().T + bias.abs())
    M = torch.from_numpy(np.float64(s_in) * s_w.astype(np.float64))
    if hp:
        if b is not None:  # a channel whose bias is beyond int32 is shifted right (section 5)
            M = M * torch.exp2(torch.tensor(R.int32_shifts(R.bias_integers(b, s_in, s_w)),
                                            dtype=torch.float64))
        deq = c.dequant(got).double()
        bound = 0.5 * M + 2.0**-23 * y.abs() + e32
        assert ((deq - y).abs() <= bound).all(), (deq, y, bound)
    else:
        q_fake = torch.round(y / s_out)
        v = y / s_out
        bound = 1 + 0.5 * M / s_out + 2.0**-14 * v.abs() + e32 / s_out
        diff = (torch.from_numpy(want).double() - q_fake).abs()
        assert (diff <= bound).all(), (diff.max(), bound.min())


@settings(max_examples=B.examples(40), deadline=None)
@given(seed=B.seeds, cin=st.sampled_from([1, 4, 64]), ksize=st.sampled_from([1, 3, 7]),
       in_dtype=B.dtypes, s_in=B.scale_strategy(-30, 10), s_out=B.scale_strategy(-30, 10),
       hp=st.booleans(), xfill=B.fills,
       wkind=st.sampled_from(["tiny", "normal", "huge", "zero_channels", "all_zero"]),
       bkind=st.sampled_from(["none", "tiny", "normal", "huge"]))
def test_conv2d_extremes_exact_or_refused(seed: int, cin: int, ksize: int, in_dtype: str,
                                          s_in: float, s_out: float, hp: bool, xfill: str,
                                          wkind: str, bkind: str) -> None:
    rng = np.random.default_rng(seed)
    conv = nn.Conv2d(cin, 3, ksize, padding=ksize // 2, bias=bkind != "none")
    w, b = _extreme_weights(rng, tuple(conv.weight.shape), wkind), _extreme_bias(rng, 3, bkind)
    B.set_param(conv.weight, w)
    B.set_param(conv.bias, b)
    scales = {"quant": s_in} if hp else {"quant": s_in, "ops.0": s_out}
    _, c = B.build(B.Chain(conv), torch.randn(1, cin, 8, 8), scales,
                   B.qconfig("qint8", {"quant": in_dtype}, high_precision=hp))
    s_w = c.ops[0].weight_scale.numpy()
    assert np.array_equal(s_w, B.weight_scales_from_range(w, b))
    q = B.ints(rng, (1, cin, 8, 8), in_dtype, xfill)
    got, want = B.agree(lambda: B.run_ops(c, B.qtensor(q, s_in, in_dtype)), lambda: R.conv2d(
        q, s_in, w, b, s_w, s_out, "qint32" if hp else "qint8", padding=ksize // 2,
        mode="accumulator" if hp else "quantized"))
    if want is not None:
        B.assert_ints(got, want, "qint32" if hp else "qint8")
