"""Cause judgement for degraded layers (qatkit.analysis.causes)."""

import json

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.analysis.causes import judge
from qatkit.analysis.compare import compare
from qatkit.analysis.sensitivity import sensitivity
from qatkit.analysis.stats import layer_stats
from qatkit.quantization.calibrate import calibrate

from ._diagnosis import MARCH, example, labelled, stages


def _evidence(layer=None, factor=20.0):
    float_model, calib, fixed = stages(layer, factor)
    x, y = labelled()
    return (compare(float_model, fixed, x[:256]), layer_stats(calib, x),
            sensitivity(calib, x, y, march=MARCH, budget=2), qk.doctor.check(calib, example()))


@pytest.mark.parametrize("factor, kind", [(20.0, "bad-scale"), (1 / 20, "clipping")])
def test_the_damage_is_named(factor, kind):
    cmp, stats, sens, doctor = _evidence("conv2", factor)
    judged = judge(cmp, stats, sens, doctor, MARCH)
    assert judged[0].layer == "conv2", [(j.layer, j.reasons) for j in judged]
    assert [j.layer for j in judged] == ["conv2"]  # the healthy layers are not blamed
    cause = judged[0].cause
    assert cause.kind == kind and cause.code == "QK105" and cause.rule
    assert ("bad scale" if kind == "bad-scale" else "clipping") in cause.title
    assert "Doctor:" in cause.evidence  # QK105 of the doctor agrees, its words are added
    assert "int16" in cause.fix and "nash-e" in cause.fix
    assert len(judged[0].reasons) == 2  # own error and sensitivity both flag it
    json.dumps([j.to_dict() for j in judged], allow_nan=False)


def test_a_healthy_model_has_no_degraded_layer():
    assert judge(*_evidence(), march=MARCH) == []


def test_any_evidence_alone_is_enough():
    cmp, stats, sens, _ = _evidence("conv2", 20.0)
    assert judge(cmp)[0].layer == "conv2"
    assert judge(cmp)[0].cause.kind == "int8-resolution"  # no statistics: no specific cause
    assert judge(sensitivity=sens)[0].layer == "conv2"
    assert judge(cmp, stats)[0].cause.kind == "bad-scale"


class Unbalanced(nn.Module):
    """Two ReLU branches added, one ~100x larger than the other."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = qk.QuantStub()
        self.a, self.relu_a = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()
        self.b, self.relu_b = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()
        self.add = qk.FloatFunctional()
        self.dequant = qk.DeQuantStub()
        with torch.no_grad():
            self.b.weight.mul_(100)
            self.b.bias.mul_(100)

    def forward(self, x):
        x = self.quant(x)
        return self.dequant(self.add.add(self.relu_a(self.a(x)), self.relu_b(self.b(x))))


def test_unbalanced_add_inputs_and_doctor_findings():
    torch.manual_seed(0)
    m = Unbalanced().eval()
    x = torch.randn(16, 1, 8, 8)
    with qk.set_march(MARCH):
        calib = calibrate(qk.prepare(m, x[:2], qconfig=qk.default_calibration_qconfig()), [x])
        fixed = qk.convert(calib)
    cmp = compare(m, fixed, x)
    doctor = qk.doctor.check(calib, x[:2])
    # a threshold no layer meets judges every layer: the evidence decides the causes
    judged = {j.layer: j for j in judge(cmp, None, None, doctor, MARCH, min_sqnr_db=1e9)}
    kinds = [c.kind for c in judged["add"].causes]
    assert kinds[0] == "unbalanced-inputs" and judged["add"].cause.code == "QK104"
    assert "Doctor:" in judged["add"].cause.evidence  # QK104 of the doctor agrees
    assert judged["a"].cause.kind == "int8-resolution"


def test_shared_module_is_named():
    from .test_compare import Twice
    torch.manual_seed(0)
    m = Twice().eval()
    qk.silence(m.add, "QK007", "testing")
    x = torch.randn(8, 1, 6, 6)
    with qk.set_march(MARCH):
        calib = calibrate(qk.prepare(m, x[:2], qconfig=qk.default_calibration_qconfig()), [x])
        fixed = qk.convert(calib)
    judged = {j.layer: j for j in judge(compare(m, fixed, x), min_sqnr_db=1e9)}
    assert judged["add#1"].cause.kind == "shared-module"
    assert judged["add#1"].cause.code == "QK007"
