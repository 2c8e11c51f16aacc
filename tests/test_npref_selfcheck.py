"""Self-checks of the NumPy reference (tests/reference/npref.py) against docs/fixed-point.md.

The expected values are worked by hand from the spec, or computed by an independent route
(exact fractions, naive float64 loops, float64 PyTorch ops on integer-valued data).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from tests.reference import npref as R

RNG_SEED = 1234


def _rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


# ---------------------------------------------------------------------------- §2, §3


def test_round_half_even_matches_ieee_rint() -> None:
    x = np.concatenate([_rng().normal(size=2000) * 300, np.arange(-10, 10) + 0.5, [0.0, -0.0]])
    assert np.array_equal(R.round_half_even(x), np.rint(x).astype(np.int64))
    assert R.round_half_even(np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])).tolist() == [
        0,
        2,
        2,
        0,
        -2,
        -2,
    ]


def test_scale_from_range() -> None:
    assert R.scale_from_range(-2.0, 1.0, "qint8") == np.float32(2.0 / 127.5)
    assert R.scale_from_range(0.0, 3.0, "qint16") == np.float32(3.0 / 32767.5)
    assert R.scale_from_range(0.0, 0.0, "qint8") == np.float32(2.0**-40)
    # 1 / 127.5 = 2**-6.99..: rounded up to 2**-6.
    assert R.scale_from_range(-1.0, 1.0, "qint8", pow2=True) == np.float32(2.0**-6)
    # Shift clamped into [1, 14].
    assert R.scale_from_range(0.0, 1000.0, "qint8", pow2=True) == np.float32(0.5)
    assert R.scale_from_range(0.0, 0.0, "qint8", pow2=True) == np.float32(2.0**-14)


def test_quantize_half_even_and_saturation() -> None:
    s = np.float32(0.25)  # power of two: k * s / s is exact
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0], dtype=np.float32) * s
    assert R.quantize(x, s, "qint8").tolist() == [0, 2, 2, 0, -2, 127, -128]
    assert R.quantize(np.float32([1000.0]) * s, s, "qint16").tolist() == [1000]


def test_quantize_divides_in_float32() -> None:
    s = np.float32(0.1)
    x = _rng().normal(size=500).astype(np.float32)
    expected = np.clip(np.rint((x / s).astype(np.float64)), -128, 127).astype(np.int64)
    assert np.array_equal(R.quantize(x, s, "qint8"), expected)


def test_dequantize_per_tensor_and_per_channel() -> None:
    q = np.array([[3, -4], [5, 6]])
    assert np.array_equal(R.dequantize(q, np.float32(0.5)), np.float32([[1.5, -2], [2.5, 3]]))
    s = np.array([0.5, 0.25], dtype=np.float32)
    assert np.array_equal(R.dequantize(q, s, axis=1), np.float32([[1.5, -1], [2.5, 1.5]]))
    assert R.dequantize(q, s, axis=0).dtype == np.float32


# ---------------------------------------------------------------------------- §4


@pytest.mark.parametrize(
    ("M", "expected"),
    [
        (0.75, (24576, 15)),
        (0.5, (16384, 15)),
        (-0.75, (-24576, 15)),
        (0.0, (0, 0)),
        (2.0**20, (16384, -6)),
        (1.0 - 2.0**-20, (16384, 14)),  # f * 2**15 rounds to 2**15: halved
        (2.0**-8, (16384, 22)),
    ],
)
def test_multiplier_hand_examples(M: float, expected: tuple[int, int]) -> None:
    assert R.multiplier(M) == expected


def test_multiplier_range_and_accuracy() -> None:
    for M in _rng().uniform(-3.0, 3.0, size=300) * 10.0 ** _rng().integers(-6, 6, size=300):
        m, n = R.multiplier(M)
        assert 2**14 <= abs(m) < 2**15
        assert abs(m * 2.0**-n - M) <= abs(M) * 2.0**-15


def test_requant_hand_examples() -> None:
    assert R.requant(3, 0.5) == 2  # 1.5: half up
    assert R.requant(-3, 0.5) == -1  # -1.5: half toward +inf
    assert R.requant(1, 0.5) == 1
    assert R.requant(-1, 0.5) == 0
    assert R.requant(-5, 0.5) == -2
    assert R.requant(7, 1.0) == 7
    assert R.requant(np.array([5, -5]), 2.0**20).tolist() == [5 * 2**20, -5 * 2**20]
    assert R.requant(np.array([6, -6, 7]), -0.5).tolist() == [-3, 3, -3]  # -3.5 -> -3


def test_requant_equals_exact_floor_formula() -> None:
    rng = _rng()
    v = rng.integers(-(2**40), 2**40, size=200)
    for M in [0.3, 1e-5, 7.25, 123456.7, 2.0**-50, -0.013]:
        m, n = R.multiplier(M)
        expected = [
            math.floor(Fraction(int(x) * m, 1) / Fraction(2) ** n + Fraction(1, 2)) for x in v
        ]
        assert R.requant(v, M).tolist() == expected


def test_requant_per_channel() -> None:
    v = np.arange(24).reshape(2, 3, 4) - 12
    M = np.array([0.5, 0.25, 3.0])
    out = R.requant(v, M, axis=1)
    for c in range(3):
        assert np.array_equal(out[:, c], R.requant(v[:, c], M[c]))
    assert np.array_equal(R.requant(v.transpose(0, 2, 1), M, axis=-1), out.transpose(0, 2, 1))
    with pytest.raises(ValueError):
        R.requant(v, M)


# ---------------------------------------------------------------------------- §5


def _naive_conv2d(x, w, b, stride, padding, dilation, groups):
    """Float64 conv by direct summation over every tap."""
    N, _, H, W = x.shape
    Cout, Cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((N, Cout, Ho, Wo))
    for n in range(N):
        for o in range(Cout):
            g = o // (Cout // groups)
            for oh in range(Ho):
                for ow in range(Wo):
                    total = 0.0 if b is None else float(b[o])
                    for c in range(Cg):
                        for i in range(kh):
                            for j in range(kw):
                                r = oh * sh - ph + i * dh
                                col = ow * sw - pw + j * dw
                                if 0 <= r < H and 0 <= col < W:
                                    total += float(x[n, g * Cg + c, r, col]) * float(w[o, c, i, j])
                    out[n, o, oh, ow] = total
    return out


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups"),
    [((1, 1), (0, 0), (1, 1), 1), ((2, 1), (1, 2), (1, 2), 2), ((1, 2), (2, 0), (2, 1), 4)],
)
def test_conv2d_acc_matches_naive_float64(stride, padding, dilation, groups) -> None:
    rng = _rng()
    x = rng.integers(-32768, 32768, size=(2, 4, 7, 6))
    w = rng.integers(-128, 128, size=(4, 4 // groups, 3, 2))
    b = rng.integers(-(2**20), 2**20, size=4)
    acc = R.conv2d_acc(x, w, b, stride, padding, dilation, groups)
    assert acc.dtype == np.int64
    expected = _naive_conv2d(x, w, b, stride, padding, dilation, groups)
    assert np.array_equal(acc, expected.astype(np.int64))


def _pow2_weights(rng, shape, axis):
    """Float weights that are exact multiples of power-of-two per-channel scales."""
    q = rng.integers(-128, 128, size=shape)
    s_w = np.float32(2.0) ** -rng.integers(3, 8, size=shape[axis]).astype(np.float32)
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    return q, s_w, (q * s_w.reshape(bshape)).astype(np.float32)


def test_weight_and_bias_quantization() -> None:
    q, s_w, w = _pow2_weights(_rng(), (3, 2, 2, 2), 0)
    assert np.array_equal(R.quantize_weight(w, s_w), q)
    s_in = np.float32(0.5)
    b = np.float32([1.5, -2.0, 300.0]) * np.float32(s_in) * s_w
    assert R.quantize_bias(b, s_in, s_w).tolist() == [2, -2, 300]  # 1.5 -> 2 (half even)
    assert np.array_equal(R.accumulator_scale(s_in, s_w), (s_in * s_w).astype(np.float32))


def test_conv2d_quantized_output_and_activations() -> None:
    # One input channel, a 1x1 kernel of weight 1: acc = q_in + q_b.
    q_in = np.array([-300, -3, -1, 1, 3, 5, 300, 2000]).reshape(1, 1, 1, 8)
    w = np.ones((1, 1, 1, 1), dtype=np.float32) * np.float32(0.5)
    s_w = np.float32([0.5])
    s_in, s_out = np.float32(1.0), np.float32(1.0)  # M = 0.5
    out = R.conv2d(q_in, s_in, w, None, s_w, s_out, "qint8")
    assert out.ravel().tolist() == [-128, -1, 0, 1, 2, 3, 127, 127]
    relu6 = R.conv2d(q_in, s_in, w, None, s_w, np.float32(0.25), "qint8", activation="relu6")
    assert relu6.ravel().tolist() == [0, 0, 0, 2, 6, 10, 24, 24]  # 6 / 0.25 = 24
    ht = R.conv2d(q_in, s_in, w, None, s_w, s_out, "qint16", activation=("hardtanh", -2.0, 100.0))
    assert ht.ravel().tolist() == [-2, -1, 0, 1, 2, 3, 100, 100]
    acc = R.conv2d(q_in[..., :7] * 2**21, s_in, w, None, s_w, s_out, "qint8", mode="accumulator")
    assert acc.ravel().tolist()[:3] == [-300 * 2**21, -3 * 2**21, -(2**21)]
    with pytest.raises(R.Refused):  # an int32 output int32 cannot hold is refused (§5)
        R.conv2d(q_in * 2**24, s_in, w, None, s_w, s_out, "qint8", mode="accumulator")
    with pytest.raises(R.Refused):  # an int32 bias tensor cannot hold 2^40 * 2 units
        R.quantize_bias(np.float32([2.0**40]), s_in, s_w)
    # ... but the layer holds it exactly (§5): 2^41 units, M = 1/2, one rounding
    assert R.bias_integers(np.float32([2.0**40]), s_in, s_w) == [2**41]
    big = R.conv2d(q_in, s_in, w, np.float32([2.0**40]), s_w, np.float32(2.0**40), "qint8")
    assert big.ravel().tolist() == [1] * 8  # (2^41 + q) * 2^-41 rounds to 1
    assert R.int32_shifts([2**41, -(2**31) - 1, -(2**31), 5]) == [13, 3, 0, 0]
    hp = R.conv2d(q_in, s_in, w, np.float32([2.0**40]), s_w, s_out, "qint32",
                  mode="accumulator")  # shifted right by 13: (2^41 + q + 2^12) >> 13
    assert hp.ravel().tolist() == [(2**41 + q + 2**12) >> 13 for q in q_in.ravel().tolist()]
    assert R.accumulator_output_scale(np.float32([2.0**40]), s_in, s_w).tolist() == [2.0**12]


torch = pytest.importorskip("torch")


def test_conv2d_and_linear_accumulators_match_torch() -> None:
    rng = _rng()
    F = torch.nn.functional
    q_w, s_w, w = _pow2_weights(rng, (6, 2, 3, 3), 0)
    b = (rng.integers(-1000, 1000, size=6) * s_w).astype(np.float32)  # s_in = 1
    x = rng.integers(-128, 128, size=(2, 4, 9, 8))
    acc = R.conv2d(x, 1.0, w, b, s_w, 1.0, "qint8", (2, 1), (1, 1), (1, 2), 2, mode="accumulator")
    t = F.conv2d(
        torch.tensor(x, dtype=torch.float64),
        torch.tensor(q_w, dtype=torch.float64),
        torch.tensor(R.quantize_bias(b, 1.0, s_w), dtype=torch.float64),
        (2, 1),
        (1, 1),
        (1, 2),
        2,
    )
    assert np.array_equal(acc, t.numpy().astype(np.int64))

    q_w, s_w, w = _pow2_weights(rng, (5, 7), 0)
    x = rng.integers(-32768, 32768, size=(3, 7))
    acc = R.linear(x, 1.0, w, None, s_w, 1.0, "qint16", mode="accumulator")
    assert np.array_equal(acc, x @ q_w.T)


@pytest.mark.parametrize(
    ("stride", "padding", "output_padding", "dilation", "groups"),
    [
        ((1, 1), (0, 0), (0, 0), (1, 1), 1),
        ((2, 3), (1, 0), (1, 2), (1, 1), 2),
        ((2, 2), (2, 1), (0, 1), (2, 1), 3),
    ],
)
def test_conv_transpose2d_accumulator_matches_torch(
    stride, padding, output_padding, dilation, groups
) -> None:
    rng = _rng()
    cin, cout_g = 6, 2
    q_w, _, _ = _pow2_weights(rng, (cin, cout_g, 3, 2), 1)
    s_w = np.float32(2.0) ** -rng.integers(3, 8, size=cout_g * groups).astype(np.float32)
    # Per output channel g * cout_g + j, as the reference maps it.
    cin_g = cin // groups
    scale = np.array(
        [[s_w[(ci // cin_g) * cout_g + j] for j in range(cout_g)] for ci in range(cin)]
    )
    w = (q_w * scale[:, :, None, None]).astype(np.float32)
    x = rng.integers(-128, 128, size=(2, cin, 4, 5))
    acc = R.conv_transpose2d(
        x,
        1.0,
        w,
        None,
        s_w,
        1.0,
        "qint8",
        stride,
        padding,
        output_padding,
        dilation,
        groups,
        mode="accumulator",
    )
    t = torch.nn.functional.conv_transpose2d(
        torch.tensor(x, dtype=torch.float64),
        torch.tensor(q_w, dtype=torch.float64),
        None,
        stride,
        padding,
        output_padding,
        groups,
        dilation,
    )
    assert np.array_equal(acc, t.numpy().astype(np.int64))


# ---------------------------------------------------------------------------- §6, §7, §8


def test_add_equal_scales_is_saturated_sum() -> None:
    rng = _rng()
    a = rng.integers(-128, 128, size=50)
    b = rng.integers(-128, 128, size=50)
    s = np.float32(0.037)
    assert np.array_equal(R.add(a, s, b, s, s, "qint8"), np.clip(a + b, -128, 127))
    assert np.array_equal(R.add(a, s, b, s, s, "qint8", sub=True), np.clip(a - b, -128, 127))
    assert np.array_equal(R.add(a, s, b, s, s, "qint8", relu=True), np.clip(a + b, 0, 127))


def test_add_hand_example_and_per_channel() -> None:
    # s_a / s_i = 0.5 * 256 = 128; s_b / s_i = 64; a_i = 384, b_i = 64 -> 448 / 256 = 1.75 -> 2.
    assert R.add(np.array([3]), 0.5, np.array([1]), 0.25, 1.0, "qint8").tolist() == [2]
    s_acc = np.float32([0.5, 0.25])
    q_acc = np.array([[3, 1], [-3, -1]])
    out = R.add(q_acc, s_acc, np.zeros((2, 2), dtype=np.int64), 1.0, 1.0, "qint8", axis_a=1)
    assert out.tolist() == [[2, 0], [-1, 0]]  # 1.5 -> 2, 0.25 -> 0, -1.5 -> -1, -0.25 -> 0
    assert R.add_scalar(np.array([3, -3]), 0.5, 0.25, 0.5, "qint8").tolist() == [4, -2]


def test_activations_and_elementwise() -> None:
    q = np.array([-5, 0, 5])
    assert R.relu(q).tolist() == [0, 0, 5]
    # ReLU6 at s_in = 0.5: clamp to [0, 12], then M = 0.5 / 1.0.
    assert R.clamp_act(np.array([-5, 3, 20]), 0.5, 0.0, 6.0, 1.0, "qint8").tolist() == [0, 2, 6]
    assert R.mul(np.array([3, -3]), 0.5, np.array([1, 1]), 1.0, 1.0, "qint8").tolist() == [2, -1]
    assert R.mul_scalar(np.array([4, 100]), 0.5, -2.0, 1.0, "qint8").tolist() == [-4, -100]
    a = np.array([[1, 2], [3, 4]])
    assert R.matmul(a, 1.0, a, 1.0, 1.0, "qint8").tolist() == [[7, 10], [15, 22]]
    assert R.sum_(a, 1.0, 1, False, 2.0, "qint8").tolist() == [2, 4]  # 1.5 -> 2, 3.5 -> 4
    assert R.mean(a, 1.0, None, True, 1.0, "qint8").tolist() == [[3]]  # 2.5 -> 3
    assert R.maximum(np.array([2, -9]), 1.0, np.array([1, -1]), 2.0, 1.0, "qint8").tolist() == [
        2,
        -2,
    ]
    assert R.minimum(np.array([2, -9]), 1.0, np.array([1, -1]), 2.0, 1.0, "qint8").tolist() == [
        2,
        -9,
    ]
    out = R.cat([np.array([[1]]), np.array([[300]])], [1.0, 1.0], 0, 1.0, "qint8")
    assert out.tolist() == [[1], [127]]
    assert R.stack([np.array([1]), np.array([3])], [1.0, 0.5], 0, 1.0, "qint8").tolist() == [
        [1],
        [2],
    ]


# ---------------------------------------------------------------------------- §9, §10


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "dilation", "ceil_mode"),
    [
        ((7, 8), 3, 2, 0, 1, False),
        ((7, 8), 3, 2, 1, 1, True),
        ((7, 8), 3, 2, 1, 2, True),
        ((5, 5), 3, 3, 1, 1, True),  # ceil-mode window starting in the right padding is dropped
    ],
)
def test_max_pool2d_matches_torch(size, kernel, stride, padding, dilation, ceil_mode) -> None:
    x = _rng().integers(-128, 128, size=(2, 3, *size))
    x[..., 0, 0] = -128  # padding must never win against the dtype minimum
    out = R.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    t = torch.nn.functional.max_pool2d(
        torch.tensor(x, dtype=torch.float64), kernel, stride, padding, dilation, ceil_mode
    )
    assert out.shape == tuple(t.shape)
    assert np.array_equal(out, t.numpy().astype(np.int64))


def test_avg_pools_round_half_up() -> None:
    x = np.array([[1, 2, -1, -2], [1, 2, -1, -2]]).reshape(1, 1, 2, 4)
    # Window sums 6 and -6, M = 1 / 4: 1.5 -> 2, -1.5 -> -1.
    assert R.avg_pool2d(x, 1.0, 2, 2, 0, 1.0, "qint8").ravel().tolist() == [2, -1]
    assert R.adaptive_avg_pool2d(x, 1.0, (1, 2), 1.0, "qint8").ravel().tolist() == [2, -1]
    # Zero padding counts in the divisor: corner window sums to 1, 1/4 -> 0.
    assert R.avg_pool2d(x, 1.0, 2, 2, 1, 1.0, "qint8")[0, 0, 0, 0] == 0
    with pytest.raises(ValueError):
        R.adaptive_avg_pool2d(x, 1.0, (1, 3), 1.0, "qint8")


def test_upsample() -> None:
    x = np.array([[1, 2], [3, 4]]).reshape(1, 1, 2, 2)
    assert R.upsample_nearest(x, 2)[0, 0].tolist() == [[1, 1, 2, 2]] * 2 + [[3, 3, 4, 4]] * 2


@pytest.mark.parametrize(
    ("size_in", "size_out", "align"), [(4, 8, False), (3, 5, True), (8, 4, False)]
)
def test_upsample_bilinear_exact_weights_match_torch(size_in, size_out, align) -> None:
    # These sizes give source fractions that are multiples of 1/256, so the integer weights
    # are exact and acc / 65536 equals PyTorch's float64 result.
    x = _rng().integers(-128, 128, size=(1, 2, size_in, size_in))
    acc = R.upsample_bilinear(x, 1.0, size_out, align, 2.0**-16, "qint32")  # M = 1
    t = torch.nn.functional.interpolate(
        torch.tensor(x, dtype=torch.float64),
        size=(size_out, size_out),
        mode="bilinear",
        align_corners=align,
    )
    assert np.array_equal(acc, (t.numpy() * 65536).astype(np.int64))


def test_lut() -> None:
    table, qmin = R.lut("hardsigmoid", 0.5, "qint8", 1.0 / 128, "qint8")
    assert qmin == -128 and table.shape == (256,)
    assert table[0 - qmin] == 64  # 0.5 * 128
    assert table[127 - qmin] == 127  # 1.0 * 128 saturated
    assert table[-6 - qmin] == 0  # x = -3
    q = np.array([-128, -1, 0, 5])
    out = R.apply_lut(q, "tanh", 0.25, "qint8", 1.0 / 64, "qint16")
    assert out.tolist() == [int(np.rint(np.tanh(v * 0.25) * 64)) for v in q]
    for kind, f in [
        ("sigmoid", lambda v: 1 / (1 + np.exp(-v))),
        ("hardswish", lambda v: v * min(max(v + 3, 0), 6) / 6),
    ]:
        table, _ = R.lut(kind, 0.0625, "qint8", 1.0 / 128, "qint16")
        assert table.tolist() == [int(np.rint(f(k * 0.0625) * 128)) for k in range(-128, 128)]
    big, qmin16 = R.lut("silu", 2.0**-8, "qint16", 2.0**-8, "qint16")
    assert big.shape == (65536,) and qmin16 == -32768
    assert big[0 - qmin16] == 0 and big[256 - qmin16] == int(np.rint(256 / (1 + np.exp(-1.0))))
