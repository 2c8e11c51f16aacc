"""Consistency levels (nash-e/nash-m): power-of-two activation (1) and weight (2) scales, the
requantization as a rounding shift (spec section 14), bit-exact against the NumPy reference;
refused on marches without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import qatkit as qk
from qatkit.base.quant_math import is_pow2, pow2_ceil
from qatkit.fixed_point import kernels as fp
from qatkit.quantization.fake_quant import fake_quants
from tests import _bitexact as B
from tests.reference import npref as R

pytestmark = pytest.mark.filterwarnings("ignore::qatkit.base.errors.QatkitWarning")


@settings(max_examples=B.examples(200), deadline=None)
@given(s=st.floats(2.0**-40, 2.0**20, allow_nan=False))
def test_pow2_ceil_is_the_smallest_power_of_two_above(s: float) -> None:
    s32 = np.float32(s)
    got = float(pow2_ceil(torch.tensor(s32)))
    k = int(np.ceil(np.log2(np.float64(s32))))
    want = next(2.0**j for j in (k - 1, k, k + 1) if 2.0**j >= float(s32))  # log2 may round
    assert got == want and is_pow2(torch.tensor(got))


@settings(max_examples=B.examples(150), deadline=None)
@given(k=st.integers(-16, 70), seed=B.seeds, mag=st.integers(0, 46))
def test_requant_shift_is_section_4(k: int, seed: int, mag: int) -> None:
    """For M = 2^-k the rounding shift (v + 2^(k-1)) >> k equals section 4's multiply-and-shift
    (m = 2^14, n = k + 14), ties and extremes included."""
    rng = np.random.default_rng(seed)
    lim = min(2**mag, 2**(61 + min(k, 0)))
    v = rng.integers(-lim, lim + 1, size=64, dtype=np.int64)
    if k >= 1 and (1 << (k - 1)) <= lim:  # exact ties j + 1/2 (within |v| <= lim)
        top = (lim - (1 << (k - 1))) >> k
        v[:8] = [(int(j) << k) + (1 << (k - 1)) for j in rng.integers(-top, top + 1, size=8)]
    v[8], v[9] = lim, -lim
    M = 2.0**-k
    assert fp.pow2_shift(M) == k and fp.pow2_shift(torch.tensor(M, dtype=torch.float64)) == k
    assert R.multiplier(M) == (2**14, k + 14)
    got = fp.requant_shift(torch.from_numpy(v), k)
    assert np.array_equal(got.numpy(), R.requant(v, M))
    assert np.array_equal(fp.requant(torch.from_numpy(v), M).numpy(), R.requant(v, M))


def test_level_refused_on_marches_without_it() -> None:
    for march in ("nash-p", "nash-h", "bayes", "nash-b"):
        with qk.set_march(march), pytest.raises(qk.QatkitError, match=rf"\[QK002\] march "
                                                rf"{march} has no consistency level 1"):
            qk.set_consistency_level(1)
    with qk.set_march("nash-e"), pytest.raises(qk.QatkitError, match=r"\[QK000\].*0, 1 or 2"):
        qk.set_consistency_level(3)
    assert qk.get_consistency_level() == 0
    with qk.set_consistency_level(2):  # no march yet: checked again at prepare
        assert qk.get_consistency_level() == 2
        with qk.set_march("bayes"), pytest.raises(qk.QatkitError, match=r"\[QK002\].*bayes"):
            qk.prepare(B.Chain(nn.Conv2d(1, 2, 3)).eval(), torch.randn(1, 1, 5, 5))
    assert qk.get_consistency_level() == 0
    spec = qk.QConfig(qk.QuantSpec(pow2=True))  # the qconfig form, refused the same way
    with qk.set_march("nash-p"), pytest.raises(qk.QatkitError, match=r"\[QK002\].*nash-p"):
        qk.prepare(B.Chain(nn.Conv2d(1, 2, 3)).eval(), torch.randn(1, 1, 5, 5), qconfig=spec)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = qk.QuantStub()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.add = qk.FloatFunctional()
        self.pool = nn.AvgPool2d(2)
        self.dequant = qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv1(self.quant(x)))
        return self.dequant(self.pool(self.add.add(self.relu2(self.conv2(y)), y)))


@pytest.mark.parametrize("level", [1, 2])
def test_levels_make_power_of_two_scales_and_stay_bit_exact(level: int) -> None:
    """Calibrate at the level: activation scales (and at level 2 weight scales) are powers of
    two, the add's and pool's multipliers (and at level 2 the convs') are exact shifts, and the
    converted conv agrees with the NumPy reference bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    with qk.set_march("nash-e"), qk.set_consistency_level(level):
        calib = qk.prepare(Net().eval(), x[:2], qconfig=qk.default_calibration_qconfig())
        qk.calibrate(calib, [x])
        c = qk.convert(calib)
    for name, fq in fake_quants(calib):
        if not fq.is_weight:
            assert is_pow2(fq.scale), name
    for conv in (c.conv1, c.conv2):  # the weight scales convert made from the weights
        assert is_pow2(conv.weight_scale) == (level == 2)
    conv = c.conv2
    s_in = float(c.conv1.out_scale)
    M = (s_in * conv.weight_scale.double()) / float(conv.out_scale)
    assert all(fp.pow2_shift(m) is not None for m in M) == (level == 2)
    q = B.ints(np.random.default_rng(0), (2, 4, 8, 8), "qint8", "random").clip(0, 127)
    got = conv(B.qtensor(q, s_in, "qint8"))
    s_w = conv.weight_scale.numpy()
    w = calib.conv2.weight.detach().numpy()
    want = R.conv2d(q, s_in, w, calib.conv2.bias.detach().numpy(), s_w,
                    float(conv.out_scale), "qint8", padding=1, activation="relu")
    B.assert_ints(got, want, "qint8", float(conv.out_scale), f"conv at level {level}")


def test_statistical_scales_are_not_loaded_into_a_level_1_model() -> None:
    x = torch.randn(8, 1, 8, 8)
    with qk.set_march("nash-e"):
        calib = qk.prepare(Net().eval(), x[:2], qconfig=qk.default_calibration_qconfig())
        qk.calibrate(calib, [x])
        with qk.set_consistency_level(1):
            qat = qk.prepare(Net().eval(), x[:2], qconfig=qk.default_qat_qconfig())
    if all(is_pow2(fq.scale) for _, fq in fake_quants(calib) if not fq.is_weight):
        pytest.skip("every calibrated scale happens to be a power of two")
    with pytest.raises(qk.QatkitError, match=r"not a power of two.*consistency level"):
        qat.load_state_dict(calib.state_dict())


def test_non_power_of_two_fixed_scale_refused_at_level_1() -> None:
    m = B.Chain(nn.Conv2d(1, 2, 3))
    m.quant = qk.QuantStub(scale=0.01)
    with qk.set_march("nash-e"), qk.set_consistency_level(1), pytest.raises(
            qk.QatkitError, match=r"fixed scale 0.01 is not a power of two"):
        qk.prepare(m.eval(), torch.randn(1, 1, 5, 5), qconfig=qk.default_qat_qconfig())
    m.quant = qk.QuantStub(scale=1 / 128)
    with qk.set_march("nash-e"), qk.set_consistency_level(1):
        p = qk.prepare(m.eval(), torch.randn(1, 1, 5, 5), qconfig=qk.default_qat_qconfig())
    assert float(p.quant.activation_post_process.scale) == 1 / 128
