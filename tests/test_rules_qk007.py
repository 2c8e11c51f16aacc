"""QK007: one FloatFunctional (or other module with its own output observer) called several
times in one forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.base.march import resolve
from qatkit.doctor.rules import Context, run
from qatkit.quantization import trace as tr
from tests._rules import calibrate, digits, qk_warnings, train


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


class ResNetDigits(nn.Module):
    """Two residual stages; ``shared=True`` reuses one FloatFunctional for both adds (the
    misuse), and one ReLU / one DeQuantStub everywhere (harmless: no output scale)."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.stem = nn.Sequential(conv_bn(1, 16), nn.ReLU())
        self.block1, self.block2 = conv_bn(16, 16), conv_bn(16, 16)
        self.relu = nn.ReLU()
        self.add1 = qk.FloatFunctional()
        self.add2 = self.add1 if shared else qk.FloatFunctional()
        self.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 10))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(self.quant(x))
        x = self.relu(self.add1.add(self.block1(x), x))
        feats = self.relu(self.add2.add(self.block2(x), x))
        return self.dequant(self.head(feats)), self.dequant(feats.flatten(1))  # logits, embedding


def _trained(shared: bool) -> ResNetDigits:
    d = digits()
    torch.manual_seed(0)
    return train(ResNetDigits(shared), d.x_train, d.y_train, epochs=3,
                 step=lambda m, x, y: nn.functional.cross_entropy(m(x)[0], y))


def test_one_floatfunctional_for_two_residual_adds_is_refused():
    d = digits()
    model = _trained(shared=True)
    with qk.set_march("nash-e"), pytest.raises(qk.QatkitError) as e:
        qk.prepare(model, d.x_train[:8], qconfig=qk.default_calibration_qconfig())
    msg = str(e.value)
    assert msg.startswith("[QK007] module 'add1'")
    assert "FloatFunctional (add) is called 2 times in one forward" in msg
    lines = [int(s.split(":")[1]) for s in msg.split(" at ")[1].split(". ")[0].split("; ")]
    src = ResNetDigits.forward.__code__.co_firstlineno
    assert lines == [src + 2, src + 3]  # both call sites, in order
    assert "one instance per call site" in msg


def test_one_floatfunctional_per_call_site_is_clean():
    d = digits()
    model = _trained(shared=False)
    with qk.set_march("nash-e"), qk_warnings() as codes:
        calib = calibrate(qk.prepare(model, d.x_train[:8],
                                     qconfig=qk.default_calibration_qconfig()), d.x_train)
        quantized = qk.convert(calib)
    assert "QK007" not in codes  # the shared ReLU and DeQuantStub are fine
    acc = float((quantized(d.x_test)[0].argmax(1) == d.y_test).float().mean())
    assert acc > 0.8


def test_doctor_finds_it_on_a_calibrated_model_and_silencing_it_breaks_convert():
    d = digits()
    model = _trained(shared=True)
    with qk.set_march("nash-e"):
        qk.silence(model.add1, "QK007", "testing the doctor on a later stage")
        calib = calibrate(qk.prepare(model, d.x_train[:8],
                                     qconfig=qk.default_calibration_qconfig()), d.x_train)
        quantized = qk.convert(calib)
    findings = list(run(Context(calib, "validation", resolve("nash-e"),
                                tr.trace(calib, d.x_train[:4])), {"QK007"}))
    assert [(f.module, f.silenced) for f in findings] == [
        ("add1", "testing the doctor on a later stage")]
    # Silencing it was wrong: convert turns the instance into fixed point under one name only,
    # so the second call site is left in QAT form and the quantized model cannot run.
    findings = list(run(Context(quantized, "converted", resolve("nash-e")), {"QK008"}))
    assert [(f.code, f.module) for f in findings] == [("QK008", "add2")]
    with pytest.raises(qk.QatkitError, match=r"^\[QK008\] a FloatFunctional .* still in QAT"):
        quantized(d.x_test[:4])
