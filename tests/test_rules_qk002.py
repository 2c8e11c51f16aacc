"""QK002: march missing, wrong for the declared processor, changed between stages, or lacking
a dtype/operator the model uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.base.march import no_march, resolve
from qatkit.doctor.rules import Context, run
from qatkit.quantization import trace as tr
from tests._rules import (
    DigitsNet,
    calibrate,
    digits,
    qk_warnings,
    train,
    trained_digits_net,
)


class GatedNet(DigitsNet):
    """DigitsNet with a squeeze-and-excitation style sigmoid gate (a lookup-table op)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_fc = nn.Conv2d(16, 16, 1)
        self.gate = nn.Sigmoid()
        self.mul = qk.FloatFunctional()
        self.gap = nn.AdaptiveAvgPool2d(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.relu2(self.add.add(self.bn2(self.conv2(x)), x))
        x = self.mul.mul(x, self.gate(self.gate_fc(self.gap(x))))  # broadcast
        return self.pool(x).flatten(1)


def test_prepare_without_march_is_refused():
    d = digits()
    with no_march(), pytest.raises(qk.QatkitError, match=r"^\[QK002\] no march is set"):
        qk.prepare(trained_digits_net(), d.x_train[:8], qconfig=qk.default_qat_qconfig())


def test_march_not_the_declared_processors():
    d = digits()
    with qk.set_march("bayes"), pytest.raises(
            qk.QatkitError, match=r"\[QK002\] march 'bayes' is not the march of the declared "
                                  r"processor 'J6E', which needs 'nash-e'"):
        qk.prepare(trained_digits_net(), d.x_train[:8], processor="J6E",
                   qconfig=qk.default_qat_qconfig())


def test_int16_on_bernoulli2_would_fail_to_compile():
    d = digits()
    with qk.set_march(processor="X3"), pytest.raises(
            qk.QatkitError, match=r"\[QK002\] module 'quant'.*activation dtype qint16.*would "
                                  r"fail to compile for bernoulli2"):
        qk.prepare(trained_digits_net(), d.x_train[:8],
                   qconfig=qk.default_calibration_qconfig(dtype="qint16"))


def test_lookup_table_op_on_bernoulli2_would_fail_to_compile():
    d = digits()
    model = train(GatedNet(), d.x_train, d.y_train, epochs=2)
    with qk.set_march("bernoulli2"), pytest.raises(qk.QatkitError) as e:
        qk.prepare(model, d.x_train[:8], qconfig=qk.default_qat_qconfig())
    assert e.value.code == "QK002"
    assert "module 'gate'" in str(e.value) and "operator 'sigmoid'" in str(e.value)
    assert "would fail to compile for bernoulli2" in str(e.value)
    assert "test_rules_qk002.py:" in str(e.value)  # the call site
    # the same model on the J5 (bayes has lookup tables, and int16)
    with qk.set_march(processor="J5"), qk_warnings() as codes:
        calib = qk.prepare(model, d.x_train[:8], processor="J5",
                           qconfig=qk.default_calibration_qconfig(dtype="qint16"))
        calibrate(calib, d.x_train)
        qk.convert(calib)
    assert "QK002" not in codes


def test_march_changed_between_calibration_and_convert():
    d = digits()
    with qk.set_march("nash-e"):
        calib = qk.prepare(trained_digits_net(), d.x_train[:8],
                           qconfig=qk.default_calibration_qconfig())
        calibrate(calib, d.x_train[:512])
    with qk.set_march("nash-p"):  # e.g. a new session that set another board's march
        with pytest.raises(qk.QatkitError, match=r"\[QK002\] this model was prepared for "
                                                 r"march 'nash-e' but the current march is "
                                                 r"'nash-p'"):
            qk.convert(calib)
        calib.train()
        with pytest.raises(qk.QatkitError, match=r"\[QK002\] this model was prepared"):
            qk.set_fake_quantize(calib, qk.FakeQuantState.QAT)
    with qk.set_march("nash-e"):  # the corrected flow: one march from prepare to convert
        quantized = qk.convert(calib)
    with no_march():  # no march set: the recorded one is used
        assert qk.convert(calib) is not None
    acc = (quantized(d.x_test).argmax(1) == d.y_test).float().mean()
    assert acc > 0.5


def test_doctor_on_prepared_model_against_other_march():
    d = digits()
    with qk.set_march("nash-e"):
        qat = qk.prepare(trained_digits_net(), d.x_train[:8], qconfig=qk.default_qat_qconfig())
    g = tr.trace(qat, d.x_train[:4])
    march = resolve("nash-e")
    assert [f.code for f in run(Context(qat, "qat", march, g), {"QK002"})] == []
    bern = resolve("bernoulli")
    findings = list(run(Context(qat, "qat", bern, g), {"QK002"}))
    assert findings and all(f.code == "QK002" and f.severity == "error" for f in findings)
    assert "prepared for march 'nash-e'" in findings[0].message
