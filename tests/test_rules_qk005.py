"""QK005: camera input must be centered YUV444 read with the fixed scale 1/128.

The task is real: tell 16x16 patches of scikit-learn's two sample photos (china, flower) apart.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.base.colour import rgb_to_yuv444
from tests._rules import calibrate, qk_warnings, train


@functools.cache
def patches() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW RGB patches (16x16) of the two photos and their photo index, shuffled."""
    from sklearn.datasets import load_sample_images
    imgs = [np.asarray(i) for i in load_sample_images().images]
    xs, ys = [], []
    for label, img in enumerate(imgs):
        for r in range(0, img.shape[0] - 16, 24):
            for c in range(0, img.shape[1] - 16, 24):
                xs.append(img[r:r + 16, c:c + 16])
                ys.append(label)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))
    return x[perm], torch.tensor(ys)[perm]


class CameraNet(nn.Module):
    def __init__(self, stub: qk.QuantStub) -> None:
        super().__init__()
        self.quant, self.dequant = stub, qk.DeQuantStub()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.body(self.quant(x)))


def _trained(stub: qk.QuantStub, x: torch.Tensor) -> CameraNet:
    _, y = patches()
    return train(CameraNet(stub), x[:600], y[:600], epochs=3, lr=3e-3)


def rgb01() -> torch.Tensor:
    return patches()[0].float() / 255  # the usual RGB pipeline


def yuv() -> torch.Tensor:
    return rgb_to_yuv444(patches()[0], centered=True).float() / 128  # camera format


def test_calibrated_input_scale_is_refused_at_prepare():
    x = yuv()
    model = _trained(qk.QuantStub(), x)
    with qk.set_march("nash-e"), pytest.raises(
            qk.QatkitError, match=r"^\[QK005\] module 'quant' \(test_rules_qk005.py:\d+\): "
                                  r".*a scale calibrated from data instead of the fixed scale "
                                  r"1/128"):
        qk.prepare(model, x[:8], qconfig=qk.default_calibration_qconfig(),
                   input_source="camera")


def test_rgb_training_data_warns_once_at_calibration():
    x = rgb01()
    model = _trained(qk.QuantStub(scale=1 / 128), x)
    with qk.set_march("nash-e"):
        with qk_warnings() as codes:
            calib = qk.prepare(model, x[:8], qconfig=qk.default_calibration_qconfig(),
                               input_source="camera")
        assert codes == []  # the stub is right; the data are not known yet
        with pytest.warns(qk.QatkitWarning, match=r"\[QK005\] module 'quant'.*do not look "
                                                  r"like centered YUV444.*never negative") as rec:
            calibrate(calib, x[:600], batch=100)  # six batches, one warning
    assert [w.message.code for w in rec] == ["QK005"]


def test_raw_centered_yuv_overflows_the_fixed_scale():
    x = yuv() * 128  # [-128, 127]: centered, but not divided by 128
    model = _trained(qk.QuantStub(scale=1 / 128), x)
    with qk.set_march("nash-e"), pytest.warns(qk.QatkitWarning, match=r"\[QK005\].*saturate"):
        calib = qk.prepare(model, x[:8], qconfig=qk.default_calibration_qconfig(),
                           input_source="camera")
        calibrate(calib, x[:200], batch=100)


@pytest.mark.parametrize("how", ["stub_scale", "fixed_scale_qconfig"])
def test_centered_yuv_with_scale_1_128_is_clean(how):
    x, (_, y) = yuv(), patches()
    stub = qk.QuantStub(scale=1 / 128) if how == "stub_scale" else qk.QuantStub()
    model = _trained(stub, x)
    qconfig = qk.QConfigMapping(qk.default_calibration_qconfig())
    if how == "fixed_scale_qconfig":
        qconfig.set_module_name("quant", qk.fixed_scale_qconfig())
    with qk.set_march("nash-e"), qk_warnings() as codes:
        calib = qk.prepare(model, x[:8], qconfig=qconfig, input_source="camera")
        calibrate(calib, x[:600], batch=100)
        quantized = qk.convert(calib)
    assert "QK005" not in codes
    assert float(quantized.quant.out_scale) == 1 / 128
    acc = float((quantized(x[600:]).argmax(1) == y[600:]).float().mean())
    assert acc > 0.7


def test_other_input_sources_are_not_checked():
    x = rgb01()
    model = _trained(qk.QuantStub(), x)
    with qk.set_march("nash-e"), qk_warnings() as codes:
        calib = qk.prepare(model, x[:8], qconfig=qk.default_calibration_qconfig())
        calibrate(calib, x[:200], batch=100)
    assert "QK005" not in codes


def test_unknown_input_source_is_a_usage_error():
    x = yuv()
    model = _trained(qk.QuantStub(scale=1 / 128), x)
    with qk.set_march("nash-e"), pytest.raises(qk.QatkitError,
                                               match=r"^\[QK000\] unknown input_source 'camra'"):
        qk.prepare(model, x[:8], qconfig=qk.default_calibration_qconfig(), input_source="camra")


def test_silencing_the_model_covers_the_calibration_batch_check():
    from qatkit.base.errors import silenced_log
    x = rgb01()
    model = _trained(qk.QuantStub(scale=1 / 128), x)
    qk.silence(model, "QK005", "RGB test rig; the board feeds YUV through insert_yuv_input")
    with qk.set_march("nash-e"), qk_warnings() as codes:
        calib = qk.prepare(model, x[:8], qconfig=qk.default_calibration_qconfig(),
                           input_source="camera")
        calibrate(calib, x[:200], batch=100)
    assert codes == []
    assert silenced_log[-1] == ("QK005", "quant", "RGB test rig; the board feeds YUV through "
                                                  "insert_yuv_input")


# ---- camera input inferred (not declared): fixed scale 1/128, processor, real photos -------

def _photos() -> torch.Tensor:
    import numpy as np
    from skimage import data as skdata
    ims = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    return torch.stack([torch.tensor(np.transpose(im[:96, :96], (2, 0, 1))) for im in ims])


class _CameraNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(scale=1 / 128), qk.DeQuantStub()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.pool(self.conv(self.quant(x))).flatten(1)))


def _photo_inputs(kind: str) -> torch.Tensor:
    from qatkit.base.colour import rgb_to_yuv444
    rgb = _photos()
    return {"rgb01": rgb.float() / 255, "rgb_pm1": rgb.float() / 127.5 - 1,
            "yuv": rgb_to_yuv444(rgb, centered=True).float() / 128}[kind]


@pytest.mark.parametrize("kind,source,expected", [
    ("rgb01", None, ["QK005"]), ("rgb_pm1", None, ["QK005"]), ("yuv", None, []),
    ("rgb_pm1", "other", [])])
def test_camera_input_inferred_from_fixed_scale_and_processor(kind, source, expected):
    x = _photo_inputs(kind)
    with qk.set_march("nash-e"), qk_warnings() as codes:
        calib = qk.prepare(_CameraNet(), x[:2], qconfig=qk.default_calibration_qconfig(),
                           processor="J6E", input_source=source)
        calib.eval()
        qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
        with torch.no_grad():
            calib(x)
        qk.set_fake_quantize(calib, qk.FakeQuantState.VALIDATION)
    assert codes == expected
    report = qk.doctor.check(_CameraNet(), x[:2], processor="J6E", input_source=source,
                             calibration_inputs=x)
    assert [f.code for f in report.findings] == expected
    if expected:
        msg = report.findings[0].message
        assert "inferred, likely" in msg and "J6E" in msg and "1/128" in msg
        if kind == "rgb_pm1":  # centered, yet RGB: the channel correlation gives it away
            assert "correlated" in msg
