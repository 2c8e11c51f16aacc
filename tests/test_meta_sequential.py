"""A top-level nn.Sequential runs after prepare and convert: qatkit_meta hands values through
unseen, and still travels in state_dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.base.errors import QatkitError
from tests._rules import digits


def test_sequential_prepare_calibrate_convert_and_checkpoint():
    d = digits()
    x = d.x_train[:64]
    model = nn.Sequential(qk.QuantStub(), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10), qk.DeQuantStub())
    model.eval()
    with qk.set_march("nash-e"):
        calib = qk.prepare(model, x[:4], qconfig=qk.default_calibration_qconfig())
        calib.eval()
        qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
        with torch.no_grad():
            calib(x)
        qk.set_fake_quantize(calib, qk.FakeQuantState.VALIDATION)
        assert "qatkit_meta._extra_state" in calib.state_dict()
        again = qk.prepare(model, x[:4], qconfig=qk.default_calibration_qconfig())
        again.load_state_dict(calib.state_dict())
        quantized = qk.convert(calib)
        with torch.no_grad():
            ref, out = model(x), quantized(x)
        assert out.shape == (64, 10)
        # the fixed-point model follows the float one (same argmax on most digits)
        assert float((ref.argmax(1) == out.argmax(1)).float().mean()) > 0.9
        assert qk.doctor.check(quantized, x[:4]).errors == []
        # the trace does not see the metadata: the graph ends at the DeQuantStub
        from qatkit.quantization import trace as tr
        g = tr.trace(calib, x[:4])
        assert "qatkit_meta" not in g.called_names()


def test_meta_is_not_a_layer():
    with qk.set_march("nash-e"):
        m = qk.prepare(nn.Sequential(qk.QuantStub(), nn.ReLU(), qk.DeQuantStub()),
                       torch.rand(1, 3, 4, 4), qconfig=qk.default_qat_qconfig())
    with pytest.raises(QatkitError, match="not a layer"):
        m.qatkit_meta(torch.rand(1), torch.rand(1))
