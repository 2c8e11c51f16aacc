"""qk.doctor.check: clean architectures at every stage, stage detection, report formats,
strict mode, silencing, and robustness (the doctor never raises for a finding)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit import doctor
from qatkit.base.march import no_march
from qatkit.doctor.rules import Finding
from tests.models import ARCHITECTURES, make_ao_eager, make_resnet

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _march():
    with qk.set_march("nash-e"):
        yield


def _no_errors(r: doctor.Report) -> None:
    assert r.errors == [], "\n".join(str(f) for f in r.errors)
    assert r.exit_code == 0


def _calibrate(p: nn.Module, x: torch.Tensor) -> nn.Module:
    p.eval()
    qk.set_fake_quantize(p, qk.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for k in range(2):
            p(x * (1 + 0.2 * k))
    return p


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_clean_architectures_have_no_errors_at_any_stage(name):
    model, x = ARCHITECTURES[name](16) if name != "ao_eager" else make_ao_eager()
    r = doctor.check(model, x)
    assert r.stage == "float" and r.march == "nash-e"
    _no_errors(r)
    p = qk.prepare(model, x, qconfig=qk.default_calibration_qconfig())
    r = doctor.check(p, x)
    assert r.stage == "prepared"
    _no_errors(r)
    _calibrate(p, x)
    r = doctor.check(p, x)
    assert r.stage == "calibrated"
    _no_errors(r)
    qk.set_fake_quantize(p, qk.FakeQuantState.VALIDATION)
    q = qk.convert(p)
    r = doctor.check(q, x)
    assert r.stage == "converted"
    _no_errors(r)


def test_torch_ao_fused_model_and_qat_stage():
    model, x = make_ao_eager(fused=True)  # torch.ao.quantization.fuse_modules applied
    _no_errors(doctor.check(model, x))
    qat = qk.prepare(model, x, qconfig=qk.default_qat_qconfig())
    qat.train()
    qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        qat(x).square().mean().backward()
        opt.step()
    r = doctor.check(qat, x)
    assert r.stage == "qat"
    _no_errors(r)
    assert qat.training  # the doctor's trace restores the mode


def test_doctor_does_not_change_the_model():
    model, x = make_resnet(16)
    before = copy.deepcopy(model.state_dict())
    doctor.check(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())
    p = qk.prepare(model, x, qconfig=qk.default_calibration_qconfig())
    _calibrate(p, x)
    fq = p.quant.activation_post_process
    seen, dirty = int(fq.observer.count), fq.scale_pending
    doctor.check(p, x)
    assert int(fq.observer.count) == seen and fq.scale_pending == dirty
    assert fq.state is qk.FakeQuantState.CALIBRATION and not p.training


def test_report_json_schema_text_and_html():
    model, x = make_resnet(16)
    model.layer_extra = nn.Conv2d(3, 3, 1)  # never called: QK101
    r = doctor.check(model, x)
    d = json.loads(r.to_json())
    assert set(d) >= {"findings", "march", "stage", "summary", "silenced"}
    assert d["march"] == "nash-e" and d["stage"] == "float"
    assert set(d["summary"]) >= {"errors", "warnings", "silenced", "strict", "exit_code"}
    assert d["summary"]["warnings"] == 1 and d["summary"]["exit_code"] == 0
    (f,) = d["findings"]
    assert set(f) >= {"code", "severity", "module", "message", "fix"}
    assert (f["code"], f["severity"], f["module"]) == ("QK101", "warning", "layer_extra")
    assert all(isinstance(f[k], str) for k in ("code", "severity", "module", "message", "fix"))
    text = r.to_text(width=120)
    assert "QK101" in text and "layer_extra" in text and "0 error(s), 1 warning(s)" in text
    assert "stage float, march nash-e" in text
    page = r.to_html()
    assert page.startswith("<!DOCTYPE html>") and "QK101" in page and "</html>" in page


def test_strict_mode_counts_warnings_as_errors():
    model, x = make_resnet(16)
    model.layer_extra = nn.Conv2d(3, 3, 1)
    r = doctor.check(model, x, strict=True)
    assert [f.code for f in r.errors] == ["QK101"] and r.warnings == [] and r.exit_code == 1
    assert json.loads(r.to_json())["findings"][0]["severity"] == "error"


def test_silenced_findings_are_listed_not_counted():
    model, x = make_resnet(16)
    model.layer_extra = qk.silence(nn.Conv2d(3, 3, 1), "QK101", "loaded by the export script")
    r = doctor.check(model, x, strict=True)
    assert r.findings == [] and r.exit_code == 0
    d = json.loads(r.to_json())
    assert d["silenced"][0]["code"] == "QK101"
    assert d["silenced"][0]["reason"] == "loaded by the export script"
    assert "silenced QK101 layer_extra: loaded by the export script" in r.to_text()


def test_errors_are_collected_not_raised():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
            self.conv, self.act = nn.Conv2d(3, 8, 3), nn.ELU()

        def forward(self, x):
            y = self.act(self.conv(self.quant(x)))
            return self.dequant(torch.cat([y, y.exp()], 1))  # cat: an operator; exp: none

    x = torch.randn(1, 3, 8, 8)
    r = doctor.check(Broken(), x)
    got = sorted(f.code for f in r.errors)
    assert got == ["QK102", "QK106"] and r.exit_code == 1
    with no_march():
        r = doctor.check(Broken(), x)
    assert "QK002" in [f.code for f in r.errors] and r.march is None


def test_forward_failure_and_missing_inputs_become_findings():
    model, _ = make_resnet(16)
    r = doctor.check(model, torch.randn(1, 5, 16, 16))  # wrong channel count
    (f,) = r.errors
    assert f.code == "QK000" and f.module == "stem.0" and "forward pass fails" in f.message
    assert r.trace_error is not None
    r = doctor.check(model)
    assert r.exit_code == 0 and any("no example inputs" in n for n in r.notes)


def test_a_crashing_rule_does_not_hide_the_others(monkeypatch):
    from qatkit.doctor.rules import rule
    r101 = rule("QK101")

    def boom(ctx):
        raise RuntimeError("bug")
        yield

    monkeypatch.setattr(r101, "check", boom)
    model, x = make_resnet(16)
    model.extra = nn.ELU()
    r = doctor.check(model, x)
    assert any(f.code == "QK101" and "internal error" in f.message for f in r.warnings)


def test_dataparallel_wrapper_is_looked_through():
    model, x = make_resnet(16)
    p = _calibrate(qk.prepare(model, x, qconfig=qk.default_calibration_qconfig()), x)
    r = doctor.check(nn.DataParallel(p), x)
    assert r.stage == "calibrated" and all(not f.module.startswith("module.")
                                           for f in r.findings)


def test_finding_str_and_report_summary():
    f = Finding("QK104", "warning", "cat", "scales differ", "normalize", "net.py:12")
    r = doctor.Report([f], [], "calibrated", "nash-e")
    assert r.summary()["warnings"] == 1 and r.exit_code == 0
    assert "net.py:12" in r.to_text()
