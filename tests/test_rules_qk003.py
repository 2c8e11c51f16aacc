"""QK003: an output conv/linear (feeding only DeQuantStubs) that keeps a quantized output."""

from __future__ import annotations

import pytest

import qatkit as qk
from qatkit.doctor.rules import Context, run
from qatkit.quantization import trace as tr
from tests._rules import calibrate, digits, qk_warnings, trained_digits_net

# A hand-made qconfig, as users write them: int8 everywhere, output layer included.
LOW_PRECISION_OUTPUT = qk.QConfig(qk.QuantSpec("qint8", "mse"), qk.QuantSpec(per_channel=True),
                                  high_precision_output=False)


def test_output_linear_without_high_precision_warns():
    d = digits()
    with qk.set_march("nash-e"):
        with pytest.warns(qk.QatkitWarning, match=r"\[QK003\] module 'fc'") as rec:
            calib = qk.prepare(trained_digits_net(), d.x_train[:8], qconfig=LOW_PRECISION_OUTPUT)
        assert {w.message.code for w in rec} == {"QK003"}
        msg = str(rec[0].message)
        assert "DeQuantStub 'dequant'" in msg and "qint32" in msg and "nash-e" in msg
        assert "high_precision_output=True" in msg
        calibrate(calib, d.x_train)
        assert calib.fc.output_mode == "quantized"
        # the doctor sees the same on the calibrated and on the converted model
        g = tr.trace(calib, d.x_train[:4])
        march = qk.get_march()
        assert [f.module for f in run(Context(calib, "validation", march, g), {"QK003"})] == \
            ["fc"]
        quantized = qk.convert(calib)
        gq = tr.trace(quantized, d.x_train[:4])
        assert [f.module for f in run(Context(quantized, "converted", march, gq),
                                      {"QK003"})] == ["fc"]


def test_default_qconfig_keeps_high_precision_output():
    d = digits()
    with qk.set_march("nash-e"), qk_warnings() as codes:
        calib = qk.prepare(trained_digits_net(), d.x_train[:8],
                           qconfig=qk.default_calibration_qconfig())
        calibrate(calib, d.x_train)
        quantized = qk.convert(calib)
    assert "QK003" not in codes
    assert calib.fc.output_mode == "high_precision"
    g = tr.trace(quantized, d.x_train[:4])
    assert list(run(Context(quantized, "converted", qk.get_march() or None, g), {"QK003"})) == []


def test_output_feeding_other_ops_is_not_flagged():
    """A linear whose output also feeds the quantized region cannot be high precision."""
    import torch
    import torch.nn as nn

    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dq1, self.dq2 = qk.QuantStub(), qk.DeQuantStub(), qk.DeQuantStub()
            self.fc1, self.relu, self.fc2 = nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.fc1(self.quant(x.flatten(1)))
            y = self.dq2(self.fc2(self.relu(h)))
            return self.dq1(h), y

    d = digits()
    with qk.set_march("bayes"), qk_warnings() as codes:
        qk.prepare(TwoOutputs(), d.x_train[:8], qconfig=LOW_PRECISION_OUTPUT)
    assert codes == ["QK003"]  # fc2 only: fc1 also feeds relu -> fc2
