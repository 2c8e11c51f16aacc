"""QK008: ops without calibration/QAT statistics, and ops added to a converted model."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.doctor.rules import Context, run
from qatkit.quantization import trace as tr
from qatkit.quantization.evaluate import evaluate
from tests._rules import calibrate, digits, qk_warnings, train


class TwoHeads(nn.Module):
    """Digits classifier with an auxiliary head (is the digit even?) used in training and,
    optionally, deployed; ``merge`` concatenates both heads' logits into one output."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant, self.dequant_aux = (qk.QuantStub(), qk.DeQuantStub(),
                                                      qk.DeQuantStub())
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(256, 10)
        self.aux_fc1, self.aux_relu, self.aux_fc2 = nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 2)
        self.merge: qk.FloatFunctional | None = None

    def forward(self, x: torch.Tensor, with_aux: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        f = self.body(self.quant(x))
        logits = self.fc(f)
        if not with_aux:
            return self.dequant(logits)
        aux = self.aux_fc2(self.aux_relu(self.aux_fc1(f)))
        if self.merge is not None:  # one deployed output: [digit logits | even logits]
            return self.dequant(self.merge.cat([logits, aux], 1))
        return self.dequant(logits), self.dequant_aux(aux)


def _step(m: TwoHeads, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out, aux = m(x, with_aux=True)
    return nn.functional.cross_entropy(out, y) + nn.functional.cross_entropy(aux, y % 2)


@functools.cache
def _trained() -> TwoHeads:
    d = digits()
    torch.manual_seed(0)
    return train(TwoHeads(), d.x_train, d.y_train, epochs=3, step=_step)


def _prepare(model: nn.Module) -> nn.Module:
    d = digits()
    return qk.prepare(model, {"x": d.x_train[:8], "with_aux": True},
                      qconfig=qk.default_calibration_qconfig())


@pytest.fixture(autouse=True)
def march():
    with qk.set_march("nash-e"):
        yield


def test_head_never_run_in_calibration_cannot_be_converted():
    d = digits()
    calib = calibrate(_prepare(_trained()), d.x_train)  # calib(x): the aux head never runs
    with pytest.raises(qk.QatkitError) as e:
        qk.convert(calib)
    msg = str(e.value)
    assert msg.startswith("[QK008] module 'aux_fc1': QATLinear has no calibration/QAT "
                          "statistics: its output observer never saw data")
    assert "exercise every op kept in the deployed model" in msg


def test_calibrating_every_deployed_head_is_clean():
    d = digits()
    calib = _prepare(_trained())
    with qk_warnings() as codes:
        calibrate(calib, d.x_train, call=lambda m, x: m(x, with_aux=True))
        quantized = qk.convert(calib)
    assert "QK008" not in codes
    out, aux = quantized(d.x_test, with_aux=True)
    assert float((out.argmax(1) == d.y_test).float().mean()) > 0.8
    assert float((aux.argmax(1) == d.y_test % 2).float().mean()) > 0.8


def test_cat_added_after_convert_is_refused():
    d = digits()
    calib = calibrate(_prepare(_trained()), d.x_train, call=lambda m, x: m(x, with_aux=True))
    quantized = qk.convert(calib)
    quantized.merge = qk.FloatFunctional()  # "one output for the board", added too late
    batches = [((d.x_test, True), d.y_test)]
    with pytest.raises(qk.QatkitError, match=r"^\[QK008\] module 'merge': FloatFunctional is "
                                             r"in the converted model but not in fixed-point "
                                             r"form"):
        evaluate(quantized, batches)
    findings = list(run(Context(quantized, "converted"), {"QK008"}))
    assert [(f.code, f.module) for f in findings] == [("QK008", "merge")]


def test_cat_added_before_prepare_goes_through_calibration():
    d = digits()
    model = _trained()
    import copy
    model = copy.deepcopy(model)
    model.merge = qk.FloatFunctional()
    calib = calibrate(_prepare(model), d.x_train, call=lambda m, x: m(x, with_aux=True))
    with qk_warnings() as codes:
        quantized = qk.convert(calib)
        acc = evaluate(quantized, [((d.x_test, True), d.y_test)],
                       metric=lambda o, y: float((o[:, :10].argmax(1) == y).float().mean()))
    assert "QK008" not in codes and acc > 0.8
    g = tr.trace(quantized, (d.x_test[:4], True))
    assert list(run(Context(quantized, "converted", graph=g), {"QK008"})) == []


class MaskedNet(nn.Module):
    """Takes an image and a validity mask; the mask multiplies the features."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.quant_mask, self.dequant = qk.QuantStub(), qk.QuantStub(), \
            qk.DeQuantStub()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.mul = qk.FloatFunctional()
        self.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        f = self.mul.mul(self.conv(self.quant(x)), self.quant_mask(mask))
        return self.dequant(self.head(f))


def test_placeholder_zero_mask_gives_degenerate_ranges():
    d = digits()
    ones = torch.ones(len(d.x_train), 1, 8, 8)
    torch.manual_seed(0)
    model = train(MaskedNet(), d.x_train, d.y_train, epochs=2,
                  step=lambda m, x, y: nn.functional.cross_entropy(m(x, ones[:len(x)]), y))
    # min/max observers: the histogram ones cannot take an all-zero batch yet (observers.py)
    calib = qk.prepare(model, (d.x_train[:8], ones[:8]),
                       qconfig=qk.default_calibration_qconfig(observer="minmax"))
    # calibration with a zero placeholder for the mask ("we only care about the image")
    calibrate(calib, d.x_train, call=lambda m, x: m(x, torch.zeros(len(x), 1, 8, 8)))
    findings = list(run(Context(calib, "convert"), {"QK008"}))
    assert [f.module for f in findings] == ["quant_mask", "mul", "head.0"]  # all zeros
    assert all("degenerate range" in f.message for f in findings)
    with pytest.raises(qk.QatkitError, match=r"^\[QK008\] module 'quant_mask'.*\(2 more error"):
        qk.convert(calib)
    calibrate(calib, d.x_train, call=lambda m, x: m(x, torch.ones(len(x), 1, 8, 8)))
    qk.convert(calib)  # the real masks: fine


def test_deploy_colour_conversion_after_the_input_stub_is_allowed():
    from qatkit.base.colour import rgb_to_yuv444
    from qatkit.quantization.deploy_input import insert_yuv_input
    from tests.test_rules_qk005 import _trained as camera_net
    from tests.test_rules_qk005 import patches, rgb01
    x, (raw, y) = rgb01(), patches()
    calib = calibrate(qk.prepare(camera_net(qk.QuantStub(), x), x[:8],
                                 qconfig=qk.default_calibration_qconfig()), x[:600], batch=100)
    deployed = insert_yuv_input(qk.convert(calib), "quant", mean=None, std=None)
    yuv = rgb_to_yuv444(raw[600:], centered=True)  # the camera's int8 bytes
    g = tr.trace(deployed, yuv[:4])
    assert list(run(Context(deployed, "converted", graph=g), {"QK008"})) == []
    with qk_warnings() as codes:
        acc = evaluate(deployed, [(yuv, y[600:])])
    assert "QK008" not in codes and acc > 0.7
