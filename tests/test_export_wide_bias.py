"""A bias beyond int32 at the accumulator scale (docs/fixed-point.md section 5, "A bias beyond
int32") in the export: the integer flavour writes the fixed point's own exact form (the int64
accumulator plus the bias in the requantization), identical in onnxruntime; the qdq flavour and
the onnxruntime target profile, whose bias is an int32 at ``s_in * s_w``, refuse it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("onnxruntime")
import onnx

import qatkit as qk
from qatkit.base.errors import QatkitError
from qatkit.export.verify import compare
from tests import _bitexact as B
from tests.test_bitexact_wide_bias import _output_scale, _wide_bias


class _Add(nn.Module):
    """A conv feeding an add: its int32 accumulator output is shifted on the wide channels."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.quant, self.qb, self.conv = qk.QuantStub(), qk.QuantStub(), conv
        self.add, self.dequant = qk.FloatFunctional(), qk.DeQuantStub()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.add.add_relu(self.qb(y), self.conv(self.quant(x))))


def _layer(kind: str, rng: np.random.Generator, s_in: float) -> tuple[nn.Module, np.ndarray,
                                                                         tuple[int, ...]]:
    """The layer with weights and a wide bias set, its float bias, and its input shape."""
    if kind == "linear":
        layer, shape, axis = nn.Linear(6, 4), (3, 6), 0
    elif kind == "conv_transpose":
        layer, shape, axis = nn.ConvTranspose2d(2, 4, 3, 2, 1, 1), (2, 2, 4, 5), 1
    else:
        layer, shape, axis = nn.Conv2d(2, 4, 3, 1, 1), (2, 2, 4, 5), 0
    w = B.float_weights(rng, layer.weight.shape, "random", channel_axis=axis)
    by_out = w if axis == 0 else np.moveaxis(w, 1, 0)
    b = _wide_bias(rng, s_in, B.weight_scales_from_range(by_out, np.ones(4, np.float32)))
    B.set_param(layer.weight, w)
    B.set_param(layer.bias, b)
    return layer, b, shape


def _model(kind: str, mode: str, in_dtype: str, out_dtype: str, s_in: float, q: float,
           seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    rng = np.random.default_rng(seed)
    layer, b, shape = _layer(kind, rng, s_in)
    s_out = _output_scale(b, s_in, np.ones(4, np.float32), q)  # the bias 2^q output steps
    hp = mode == "hp"
    if kind == "conv_add":
        m = _Add(layer)
        example = (torch.randn(1, *shape[1:]), torch.randn(1, 4, *shape[2:]))
        scales = {"quant": s_in, "qb": s_out, "add": s_out}
        qc = B.qconfig(out_dtype, {"quant": in_dtype})
    else:
        act = {"relu": [nn.ReLU()], "relu6": [nn.ReLU6()]}.get(mode, [])
        m = B.Chain(layer, *act)
        example = (torch.randn(1, *shape[1:]),)
        scales = {"quant": s_in} if hp else {"quant": s_in, "ops.0": s_out}
        qc = B.qconfig(out_dtype, {"quant": in_dtype}, high_precision=hp)
    _, c = B.build(m, example, scales, qc)
    data = [torch.from_numpy(B.ints(rng, (5, *t.shape[1:]), in_dtype, "random")
                             .astype(np.float32) * np.float32(s_in)) for t in example]
    if kind == "conv_add":
        data[1] = data[1] / np.float32(s_in) * np.float32(s_out) * 4  # some saturate
    data[0][0] *= 8  # saturated inputs
    return c, tuple(data)


def _wide(c: nn.Module) -> dict:
    mod = c.conv if hasattr(c, "conv") else c.ops[0]
    (plan,) = mod._cache.values()
    assert plan["wide"] is not None and plan["q_b"] is None  # section 5's form
    return plan["wide"]


def _identical(c: nn.Module, data: tuple[torch.Tensor, ...]) -> None:
    model = qk.export_onnx(c, data)
    onnx.checker.check_model(model, full_check=True)
    r = compare(model, c, data)
    assert r["identical"], [x for x in r["outputs"] + r["layers"] if x["identical"] < 1]
    assert len(r["layers"]) >= 2


@settings(max_examples=B.examples(16), deadline=None, derandomize=True)
@given(seed=B.seeds, kind=st.sampled_from(["linear", "conv", "conv_transpose", "conv_add"]),
       mode=st.sampled_from([None, "relu", "relu6", "hp"]), in_dtype=B.dtypes,
       out_dtype=B.dtypes, s_in=B.scales, q=st.floats(-2, 16))
def test_integer_flavour_exports_wide_biases_exactly(seed, kind, mode, in_dtype, out_dtype,
                                                     s_in, q):
    if (kind, mode) in (("conv_transpose", "relu"), ("conv_transpose", "relu6"),
                        ("linear", "relu6")):
        mode = None  # no fused form: a transposed conv has none, a linear no ReLU6
    c, data = _model(kind, "hp" if kind == "conv_add" else mode, in_dtype, out_dtype, s_in, q,
                     seed)
    c(*data)
    _wide(c)
    _identical(c, data)


def test_every_branch_of_the_wide_plan():
    """Biases up to 2^90 at output scales that make right shifts of 63 (the two-step floor,
    with and without the bump) and, at a tiny output scale, left shifts (n <= 0): each model
    that reaches a branch not seen yet is exported and checked."""
    found: set[str] = set()
    for q, seed in [(q, seed) for seed in range(60) for q in (0.0, 60.0)]:
        c, data = _model("linear", None, "qint8", "qint16", 2.0**-6, q, seed)
        c(*data)
        p = _wide(c)
        new = {k for k, hit in (("right63", (p["right"] == 63).any()),
                                ("bump", (p["bump"] != 0).any()),
                                ("left", (p["left"] > 0).any())) if hit} - found
        if new:
            _identical(c, data)
            found |= new
        if len(found) == 3:
            break
    assert found == {"right63", "bump", "left"}, found


def test_qdq_and_profile_refuse_a_wide_bias():
    c, data = _model("conv", "relu", "qint8", "qint8", 2.0**-5, 4.0, 0)
    c(*data)
    _wide(c)
    with pytest.raises(QatkitError, match=r"QK106.*'ops\.0'.*beyond int32.*flavour='integer'"):
        qk.export_onnx(c, data, flavour="qdq")
    # the same layer under the onnxruntime profile: refused at its first call, never wrapped
    rng = np.random.default_rng(0)
    layer, _, shape = _layer("conv", rng, 2.0**-5)
    m = B.Chain(layer, nn.ReLU()).eval()
    x = torch.randn(*shape)
    with qk.set_march("nash-e"):
        p = qk.prepare(m, x, qconfig=B.qconfig("qint8"))
        B.set_scales(p, {"quant": 2.0**-5, "ops.0": 2.0**-2})
        prof = qk.convert(p, profile="onnxruntime")
    with pytest.raises(QatkitError, match=r"QK106.*profile 'onnxruntime'.*QConv2d 'ops\.0'.*"
                       r"bias of output channel \d .* beyond int32.*int32 bias"):
        prof(x)
