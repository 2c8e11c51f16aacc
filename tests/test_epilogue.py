"""The compiled kernels (qatkit/fixed_point/epilogue.py) give the reference path's integers.

The suite runs on the reference path (the default; conftest also sets
``QATKIT_KERNELS=reference`` for child processes: compiling costs seconds per kernel). Here the
compiled path is checked against the reference path on the kernels themselves, and against
the NumPy reference through the bit-exactness tests' own checks (fewer examples: shapes are
symbolic, but size-1 dimensions and dtypes recompile).
``QATKIT_KERNELS=compiled python -m pytest tests/test_bitexact.py tests/test_bitexact_ops.py``
runs every bit-exactness test on the compiled path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qatkit.fixed_point import epilogue
from qatkit.fixed_point import kernels as fp
from tests import _bitexact as B
from tests import test_bitexact as TB
from tests import test_bitexact_ops as TO

pytestmark = pytest.mark.skipif(not epilogue.compile_available(),
                                reason="torch.compile cannot generate code on this machine")


@pytest.fixture(scope="module", autouse=True)
def _compile_every_combination():
    # hypothesis draws many dtype/rank combinations (a model has a few); keep them all compiled
    # rather than falling back to eager at Dynamo's recompile limit
    import torch._dynamo
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
        yield


def _ref_add(qa: torch.Tensor, ma: torch.Tensor, qb: torch.Tensor, mb: torch.Tensor, sign: int,
             lo: int, hi: int) -> torch.Tensor:
    """Section 6 in int64 as written (section 4's rule), the multipliers given as m * 2^-n."""
    def rq(q: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
        m, n = fp.multiplier(mult)
        return fp.requant_mn(q, m.reshape(mult.shape), n.reshape(mult.shape))
    total = rq(qa, ma) + sign * rq(qb, mb)
    return fp.requant_mn(total, *fp.multiplier(2.0**-8)).clamp(lo, hi)


@settings(max_examples=B.examples(10), deadline=None)
@given(seed=B.seeds, n=st.integers(1, 3), c=st.integers(2, 9), hw=st.integers(2, 6),
       nhwc=st.booleans(), mag=st.sampled_from([2**8, 2**20, 2**31 - 1]),
       relu=st.booleans(), out=st.sampled_from(["qint8", "qint16"]))
def test_conv_epilogue_compiled_equals_reference(seed: int, n: int, c: int, hw: int, nhwc: bool,
                                                 mag: int, relu: bool, out: str) -> None:
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-mag, mag, (n, hw, hw, c) if nhwc else (n, c, hw, hw), generator=g,
                        dtype=torch.int64).to(torch.int32)
    if nhwc:  # the layout an im2col conv produces: NCHW shape over NHWC memory
        acc = acc.permute(0, 3, 1, 2)
    m, nn_ = fp.multiplier(torch.rand(c, generator=g, dtype=torch.float64) * 2.0 ** -(
        seed % 30))
    q_b = torch.randint(-2**20, 2**20, (c,), generator=g)
    plan = fp.requant_plan(m, nn_, q_b, mag)
    if plan is None:
        return
    lo, hi = fp.qrange(out)
    lo = 0 if relu else lo
    want = fp.requant_f64(acc, plan, lo, hi, out, 1)
    mult, addend = (fp.along(t, 1, 4) for t in plan)
    got = epilogue.conv_requant(acc, mult, addend, lo, hi, want.dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert got.stride() == want.stride() or not nhwc or got.is_contiguous(
        memory_format=torch.channels_last)
    int64 = fp.requant_mn(acc.to(torch.int64) + q_b.reshape(1, -1, 1, 1), m, nn_, 1)
    assert torch.equal(got.to(torch.int64), int64.clamp(lo, hi))


@settings(max_examples=B.examples(10), deadline=None)
@given(seed=B.seeds, shape=st.sampled_from([(6,), (2, 5), (2, 3, 4, 4)]),
       dts=st.tuples(st.sampled_from(["qint8", "qint16", "qint32"]),
                     st.sampled_from(["qint8", "qint16"])),
       per_channel=st.booleans(), sign=st.sampled_from([1, -1]), relu=st.booleans(),
       e=st.tuples(st.integers(-20, 12), st.integers(-20, 12)))
def test_add_epilogue_compiled_equals_int64_rule(seed: int, shape: tuple, dts: tuple,
                                                 per_channel: bool, sign: int, relu: bool,
                                                 e: tuple) -> None:
    rng = np.random.default_rng(seed)
    qa = torch.from_numpy(B.ints(rng, shape, dts[0], "random"))
    qb = torch.from_numpy(B.ints(rng, shape, dts[1], "extremes"))
    axis = 1 if per_channel and len(shape) > 1 else None
    ca = shape[1] if axis is not None else 1
    ma = torch.from_numpy(rng.uniform(1, 2, ca) * 2.0 ** e[0])
    mb = torch.tensor(float(rng.uniform(1, 2)) * 2.0 ** e[1], dtype=torch.float64)
    fa, fb = fp.float_multiplier(ma), fp.float_multiplier(mb)
    if fa is None or fb is None:
        return
    fa = fp.along(fa if axis is not None else fa.reshape(()), axis, len(shape))
    lo, hi = (0 if relu else -128), 127
    got = epilogue.add_requant(qa, fa, qb, fb, sign, lo, hi, torch.int8)
    want = _ref_add(qa, fa, qb, fb, sign, lo, hi)
    assert got.dtype == torch.int8 and torch.equal(got.to(torch.int64), want)


@settings(max_examples=B.examples(3), deadline=None)  # one compile per geometry
@given(seed=B.seeds, n=st.integers(1, 2), c=st.integers(1, 5), h=st.integers(3, 9),
       w=st.integers(3, 9), k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       p=st.tuples(st.integers(0, 2), st.integers(0, 2)))
def test_im2col_compiled_equals_strided_view(seed: int, n: int, c: int, h: int, w: int,
                                             k: tuple, s: tuple, p: tuple) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (n, c, h, w), generator=g).to(torch.int8).permute(0, 2, 3, 1)
    xp = torch.nn.functional.pad(x, (0, 0, p[1], p[1], p[0], p[0]))
    ho, wo = (xp.shape[1] - k[0]) // s[0] + 1, (xp.shape[2] - k[1]) // s[1] + 1
    sn, sh, sw, sc = xp.stride()
    want = xp.as_strided((n, ho, wo, k[0], k[1], c),
                         (sn, sh * s[0], sw * s[1], sh, sw, sc)).reshape(n * ho * wo, -1)
    got = epilogue.im2col(x, k, s, p, (1, 1))
    assert got.shape == want.shape and torch.equal(got, want)


# ----------------------------------------------------------- against the NumPy reference


@settings(max_examples=B.examples(4), deadline=None)
@given(case=TB.conv_cases(), in_dtype=B.dtypes, out_dtype=B.dtypes, s_in=B.scales,
       s_out=B.scales, act=st.sampled_from([None, "relu", "relu6"]))
def test_conv2d_compiled_vs_npref(case: dict, in_dtype: str, out_dtype: str,
                                  s_in: float, s_out: float, act: str | None) -> None:
    with epilogue.kernels("compiled"):
        TB.test_conv2d.hypothesis.inner_test(case, in_dtype, out_dtype, s_in, s_out, act)


@settings(max_examples=B.examples(6), deadline=None)
@given(op=st.sampled_from(["add", "add_relu", "sub"]), a=TO._operands(2),
       fused_relu=st.booleans())
def test_add_compiled_vs_npref(op: str, a: dict, fused_relu: bool) -> None:
    with epilogue.kernels("compiled"):
        TO.test_binary.hypothesis.inner_test(op, a, fused_relu)


@settings(max_examples=B.examples(3), deadline=None)
@given(case=TB.conv_cases(), in_dtype=B.dtypes, b_dtype=B.dtypes, out_dtype=B.dtypes,
       s_in=B.scales, s_b=B.scales, s_out=B.scales, relu=st.booleans(), bfill=B.fills)
def test_conv2d_fused_add_compiled_vs_npref(case: dict, in_dtype: str,
                                            b_dtype: str, out_dtype: str, s_in: float,
                                            s_b: float, s_out: float, relu: bool,
                                            bfill: str) -> None:
    with epilogue.kernels("compiled"):
        TB.test_conv2d_fused_add.hypothesis.inner_test(case, in_dtype, b_dtype, out_dtype, s_in,
                                                   s_b, s_out, relu, bfill)


@pytest.mark.parametrize("march", ["nash-e", "nash-p"])
def test_whole_model_compiled_vs_npref(march: str) -> None:
    with epilogue.kernels("compiled"):
        TB.test_whole_model_set_scales.hypothesis.inner_test(march, 7, "qint8",
                                                         [0.05, 0.04, 0.03, 0.02])


def test_default_is_reference_and_bad_environment_value() -> None:
    """Without QATKIT_KERNELS the plain path runs (nothing compiles on a first call); a wrong
    value is refused naming the variable."""
    import os
    import subprocess
    import sys
    code = "from qatkit.fixed_point import epilogue; print(epilogue.get_kernels())"
    env = {k: v for k, v in os.environ.items() if k != "QATKIT_KERNELS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "reference", out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "QATKIT_KERNELS": "fast"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "QATKIT_KERNELS" in out.stderr
    assert "unknown kernel mode 'fast'" in out.stderr


def test_mode_switch_and_bad_mode() -> None:
    from qatkit.base.errors import QatkitError
    assert epilogue.get_kernels() == "reference"  # conftest
    with epilogue.kernels("compiled"):
        assert epilogue.get_kernels() == "compiled"
        assert epilogue.use_compiled(torch.zeros(1))
    assert not epilogue.use_compiled(torch.zeros(1))
    with pytest.raises(QatkitError, match="unknown kernel mode"):
        epilogue.set_kernels("fast")


@pytest.mark.parametrize("m,k,n", [(1, 3, 5), (16, 8, 8), (17, 9, 7), (40, 64, 3)])
def test_int_mm_under_cuda_shape_rules(m: int, k: int, n: int) -> None:
    """The zero padding that satisfies torch._int_mm's CUDA shape rules changes no sum."""
    g = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-128, 128, (m, k), generator=g).to(torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=g).to(torch.int8)
    want = a.to(torch.int64) @ b.to(torch.int64)
    got = fp.int_mm(a, b, cuda_rules=True)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got.to(torch.int64), want)
