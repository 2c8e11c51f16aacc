"""Integer ONNX flavour of the operators of docs/fixed-point.md sections 10 and 14-17 (PReLU,
LeakyReLU, Softmax, LayerNorm/LayerNorm2d, GELU, AvgPool2d with per-position divisors):
onnxruntime computes exactly qatkit's integers, per layer; the qdq flavour's standard ops."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx

import qatkit as qk
from qatkit.base.errors import QatkitError
from qatkit.export.verify import compare
from tests._export_models import NormActOps, prepared_and_converted

pytestmark = pytest.mark.filterwarnings("ignore::qatkit.base.errors.QatkitWarning")

NEW = {"prelu": "QPReLU", "prelu1": "QPReLU", "leaky": "QPReLU", "ln2d": "QLayerNorm",
       "ln": "QLayerNorm", "gelu": "QLookupTable", "gelu_tanh": "QLookupTable",
       "pool": "QAvgPool2dDivisor", "pool2": "QAvgPool2dDivisor", "softmax": "QSoftmax",
       "softmax_last": "QSoftmax"}


def _data() -> torch.Tensor:
    """Ordinary values, a constant image (constant LayerNorm groups: D = E, or 0), and values
    far beyond the calibrated range (saturated inputs and outputs everywhere)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 7, 7, generator=g)
    x[1] = 0.0
    x[2] *= 8.0
    return x


@pytest.mark.parametrize("march,dtype,level", [("nash-e", "qint8", 0), ("nash-e", "qint16", 0),
                                               ("bayes", "qint8", 0), ("bayes", "qint16", 0),
                                               ("nash-e", "qint8", 1)])
def test_norm_act_ops_identical(march, dtype, level):
    x = torch.randn(2, 3, 7, 7)
    ctx = qk.set_consistency_level(level) if level else contextlib.nullcontext()
    with qk.set_march(march), ctx:
        _, q = prepared_and_converted(NormActOps(), x, march,
                                      qconfig=qk.default_calibration_qconfig(dtype))
    mods = dict(q.named_modules())
    assert {k: type(mods[k]).__name__ for k in NEW} == NEW
    assert {mods[k].kind for k in ("gelu", "gelu_tanh")} == {"gelu", "gelu_tanh"}
    assert mods["ln2d"].channel_axis == 1 and mods["ln"].channel_axis is None
    model = qk.export_onnx(q, x)
    onnx.checker.check_model(model, full_check=True)
    r = compare(model, q, _data())
    assert r["identical"], [x for x in r["outputs"] + r["layers"] if x["identical"] < 1]
    assert set(NEW) <= {row["name"] for row in r["layers"]}  # each op's integers compared


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_norm_act_ops_qdq_standard_ops(dtype):
    """The qdq flavour writes each as its standard ONNX op (Gelu from opset 21, the Erf/Tanh
    forms at 17), passes the full check and runs in onnxruntime; its distance is measured."""
    x = torch.randn(2, 3, 7, 7)
    _, q = prepared_and_converted(NormActOps(), x, "nash-e",
                                  qconfig=qk.default_calibration_qconfig(dtype))
    model = qk.export_onnx(q, x, flavour="qdq")
    onnx.checker.check_model(model, full_check=True)
    kinds = {n.op_type for n in model.graph.node}
    assert {"PRelu", "LeakyRelu", "Softmax", "LayerNormalization", "AveragePool"} <= kinds
    assert ({"Gelu"} if dtype == "qint16" else {"Erf", "Tanh"}) <= kinds
    assert not kinds & {"ConvInteger", "MatMulInteger", "Mod", "Gather"}
    r = compare(model, q, _data())
    layers = {row["name"]: row for row in r["layers"]}
    assert layers["quant"]["identical"] == 1.0 and set(NEW) <= set(layers)
    assert np.mean([row["identical"] for row in r["layers"]]) > 0.5


class _PoolOverride(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.pool = torch.nn.AvgPool2d(2, ceil_mode=True, divisor_override=3)

    def forward(self, x):
        return self.dequant(self.pool(self.quant(x)))


def test_divisor_override_with_ceil_mode_refused_in_qdq_exact_in_integer():
    x = torch.randn(2, 3, 5, 5)
    _, q = prepared_and_converted(_PoolOverride(), x, "nash-e")
    with pytest.raises(QatkitError, match=r"QK106.*'pool'.*divisor_override and ceil_mode"):
        qk.export_onnx(q, x, flavour="qdq")
    assert compare(qk.export_onnx(q, x), q, x * 3)["identical"]


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_norm_variants_identical(dtype):
    from tests._export_models import NormVariants
    x = torch.randn(2, 12)
    _, q = prepared_and_converted(NormVariants(), x, "nash-e",
                                  qconfig=qk.default_calibration_qconfig(dtype))
    model = qk.export_onnx(q, x)
    data = torch.randn(5, 12, generator=torch.Generator().manual_seed(9))
    data[0] = 0.0
    data[1] *= 10.0
    r = compare(model, q, data)
    assert r["identical"], [x for x in r["outputs"] + r["layers"] if x["identical"] < 1]
    assert {"ln_wide", "prelu", "ln_2d", "softmax"} <= {row["name"] for row in r["layers"]}


class _Int16Gemms(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv = torch.nn.Conv2d(8, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6 * 5 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.conv(self.quant(x)).flatten(1)))


def test_int16_inputs_at_the_extremes_identical():
    """The int16 split ``2^14 a + 2^7 b + c`` (integer flavour) gives every accumulator exactly
    in onnxruntime where the input sits at the int16 bounds and the weights at the int8 bounds
    with the same sign in adjacent taps: the case where a uint8 part of up to 255 (the earlier
    ``256 hi + lo`` split) saturates the int16 pair sums of onnxruntime's AVX2 kernels."""
    x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(3))
    qc = qk.default_calibration_qconfig("qint16")
    _, q = prepared_and_converted(_Int16Gemms(), x, "nash-e", qconfig=qc)
    with torch.no_grad():  # weights at the int8 bounds, one sign per output channel
        for mod in (q.conv, q.fc):
            sign = torch.where(torch.arange(mod.weight.shape[0]) % 2 == 0, 1, -1)
            mod.weight.copy_((sign.view(-1, *[1] * (mod.weight.dim() - 1))
                              * torch.where(mod.weight >= 0, 127, 128)).to(mod.weight.dtype))
    s = float(q.quant.real("out_scale"))
    data = torch.cat([torch.full((1, 8, 5, 5), 40000 * s), torch.full((1, 8, 5, 5), -40000 * s),
                      torch.full((1, 8, 5, 5), 255.0 * s),  # every low byte 255
                      x * 1000.0])
    r = compare(qk.export_onnx(q, x), q, data)
    assert r["identical"], [v for v in r["outputs"] + r["layers"] if v["identical"] < 1]
