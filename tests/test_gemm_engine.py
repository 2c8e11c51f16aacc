"""The int8 x int8 GEMM engine (qatkit/fixed_point/gemm.py, spec section 12): ``_int_mm`` and
float32 give the same integers, so the choice (timed once per device type, or forced) changes
only the speed; layers whose bound reaches 2^24 take float32 only split into channel ranges
that each stay below it; float32 runs in full IEEE
precision whatever reduced precision the user turned on."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import qatkit as qk
from qatkit.fixed_point import gemm
from qatkit.fixed_point import kernels as fp
from tests import _bitexact as B
from tests.reference import npref as R

pytestmark = pytest.mark.filterwarnings("ignore::qatkit.base.errors.QatkitWarning")


def test_engine_choice() -> None:
    assert gemm.engine(torch.device("cpu")) in ("int_mm", "float32")
    small = torch.full((4, 8, 3, 3), 3, dtype=torch.int8)  # bound 128 * 216 * 3 < 2^24
    big = torch.full((4, 512, 3, 3), 127, dtype=torch.int8)  # 128 * 4608 * 127 >= 2^24
    for mode in ("int_mm", "float32"):
        with gemm.int8_gemm(mode):
            assert fp.conv_method(small, "qint8", 1) == mode
            # past 2^24 plain float32 would round: split over channels, or int_mm
            assert fp.conv_method(big, "qint8", 1) == (
                "int_mm" if mode == "int_mm" else "float32_split")
            assert fp.conv_method(small, "qint16", 1) == "float32"  # int16: bounds only
    assert gemm.get_int8_gemm() == "auto"


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(qk.QatkitError, match=r"QK000.*not an int8 GEMM engine"):
        gemm.set_int8_gemm("int4")
    env = {**os.environ, "QATKIT_INT8_GEMM": "fast"}
    r = subprocess.run([sys.executable, "-c", "import qatkit.fixed_point.gemm"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "QATKIT_INT8_GEMM='fast' is not an int8 GEMM engine" in r.stderr


def test_full_precision_whatever_the_user_set() -> None:
    """``set_float32_matmul_precision("medium")`` makes oneDNN's float32 matmuls bf16 where
    the CPU has it: inside the exact kernels it is "ieee", and restored after."""
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        outside = torch.backends.mkldnn.matmul.fp32_precision
        with fp.no_tf32():
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
            assert torch.backends.mkldnn.conv.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == outside
    finally:
        torch.set_float32_matmul_precision(old)


class Net(nn.Module):
    """conv -> conv (+ residual) -> linear, and an int8 x int8 batched matmul (no ReLU: a
    one-channel ReLU output may be all zeros, which calibration rightly refuses)."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.c1 = nn.Conv2d(3, c, k, padding=k // 2)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.add, self.mm = qk.FloatFunctional(), qk.FloatFunctional()
        self.fc = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(self.quant(x))
        x = self.add.add(self.c2(x), x)
        y = self.mm.matmul(x, x.transpose(-1, -2))  # [n, c, h, h]
        return self.dequant(self.fc(y.mean((2, 3))))


@settings(max_examples=B.examples(12), deadline=None)
@given(seed=B.seeds, c=st.integers(1, 24), k=st.sampled_from([1, 3, 5]), n=st.integers(1, 4),
       hw=st.integers(3, 9), gain=st.sampled_from([0.01, 1.0, 100.0]))
def test_engines_give_the_same_integers(seed: int, c: int, k: int, n: int, hw: int,
                                        gain: float) -> None:
    """A calibrated model converted twice, once per engine: every output integer equal."""
    torch.manual_seed(seed % 2**31)
    x = torch.randn(n, 3, hw, hw) * gain
    with qk.set_march("nash-e"):
        calib = qk.prepare(Net(c, k), x, qconfig=qk.default_calibration_qconfig())
        qk.calibrate(calib, [x, torch.randn_like(x) * gain])
        outs, methods = [], []
        for mode in ("int_mm", "float32"):
            with gemm.int8_gemm(mode):
                fixed = qk.convert(calib)
                outs.append(fixed(x))
                methods.append({m._cache[key]["method"] for m in (fixed.c1, fixed.c2, fixed.fc)
                                for key in m._cache})
    assert torch.equal(outs[0], outs[1])
    assert "int_mm" in methods[0]
    assert methods[1] <= {"float32", "int_mm"}


def test_float32_engine_against_reference() -> None:
    """Extreme int8 values through a conv whose bound is just under 2^24 by float32, and the
    NumPy reference."""
    rng = np.random.default_rng(0)
    conv = nn.Conv2d(8, 4, 3, bias=False)
    w = B.float_weights(rng, (4, 8, 3, 3), "extremes")
    B.set_param(conv.weight, w)
    q = B.ints(rng, (2, 8, 6, 6), "qint8", "extremes")
    _, c = B.build(B.Chain(conv), torch.randn(2, 8, 6, 6), {"quant": 0.5},
                   B.qconfig("qint8", high_precision=True))
    assert fp.acc_bound(c.ops[0].weight, "qint8") < fp.F32_EXACT
    with gemm.int8_gemm("float32"):
        got = c.ops[0](B.qtensor(q, 0.5, "qint8"))
    assert next(iter(c.ops[0]._cache.values()))["method"] == "float32"
    want = R.conv2d(q, 0.5, w, None, c.ops[0].weight_scale.numpy(), 1.0, "qint32", (1, 1),
                    (0, 0), (1, 1), 1, mode="accumulator")
    B.assert_ints(got, want, what="conv2d by the float32 engine")


def test_chunks_keep_each_partial_sum_below_2_24() -> None:
    rng = np.random.default_rng(1)
    q_w = torch.from_numpy(rng.integers(-128, 128, size=(6, 300, 3, 3))).to(torch.int8)
    chunks = fp.f32_chunks(q_w, "qint8")
    assert chunks is not None and len(chunks) > 1
    assert chunks[0][0] == 0 and chunks[-1][1] == 300
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    for lo, hi in chunks:
        assert fp.acc_bound(q_w[:, lo:hi], "qint8") < fp.F32_EXACT
    for lo, hi in chunks[:-1]:  # as long as they can be: one more channel would reach 2^24
        assert fp.acc_bound(q_w[:, lo:hi + 1], "qint8") >= fp.F32_EXACT
    # one channel of a 32x32 kernel of -128: 1024 * 2^14 = 2^24 taps alone, no split exists
    lone = torch.full((1, 1, 32, 32), -128, dtype=torch.int8)
    assert fp.f32_chunks(lone, "qint8") is None
    with pytest.raises(qk.QatkitError, match=r"QK106.*one input channel alone"):
        fp.conv2d(torch.zeros(1, 1, 32, 32, dtype=torch.int8), lone, (1, 1), (0, 0), (1, 1),
                  1, "float32_split")
    with gemm.int8_gemm("float32"):
        assert fp.conv_method(q_w, "qint8", 1) == "float32_split"
        assert fp.conv_method(lone, "qint8", 1) == "int_mm"


@settings(max_examples=B.examples(15), deadline=None)
@given(seed=B.seeds, cin=st.integers(200, 700), fill=st.sampled_from(["extremes", "max",
                                                                       "random"]),
       hp=st.booleans(), s_out=B.scales)
def test_float32_split_conv_against_reference(seed: int, cin: int, fill: str, hp: bool,
                                              s_out: float) -> None:
    """Convs whose sums reach past 2^24 (up to 6300 taps of extreme values) on the float32
    engine: split over input channels, the same integers as the NumPy reference."""
    rng = np.random.default_rng(seed)
    conv = nn.Conv2d(cin, 3, 3, padding=1, bias=False)
    w = B.float_weights(rng, (3, cin, 3, 3), fill)
    B.set_param(conv.weight, w)
    q = B.ints(rng, (1, cin, 4, 4), "qint8", fill)
    s_in = 2.0**-4
    scales = {"quant": s_in} if hp else {"quant": s_in, "ops.0": s_out}
    _, c = B.build(B.Chain(conv), torch.randn(1, cin, 4, 4), scales,
                   B.qconfig("qint8", high_precision=hp))
    if fp.acc_bound(c.ops[0].weight, "qint8") < fp.F32_EXACT:
        return  # a small draw of "random" weights: the plain float32 case
    with gemm.int8_gemm("float32"):
        got, want = B.agree(lambda: c.ops[0](B.qtensor(q, s_in, "qint8")), lambda: R.conv2d(
            q, s_in, w, None, c.ops[0].weight_scale.numpy(), s_out,
            "qint32" if hp else "qint8", (1, 1), (1, 1), (1, 1), 1,
            mode="accumulator" if hp else "quantized"))
    if want is None:
        return
    assert next(iter(c.ops[0]._cache.values()))["method"] == "float32_split"
    B.assert_ints(got, want, what="conv2d by float32_split")
