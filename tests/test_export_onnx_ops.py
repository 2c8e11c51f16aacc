"""Integer ONNX flavour of the operators of docs/fixed-point.md sections 10 and 14-17 (PReLU,
LeakyReLU, Softmax, LayerNorm/LayerNorm2d, GELU, AvgPool2d with per-position divisors):
onnxruntime computes exactly qatkit's integers, per layer; the qdq flavour's standard ops."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx

import qatkit as qk
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
