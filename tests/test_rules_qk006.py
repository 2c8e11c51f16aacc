"""QK006: accuracy monitored on the QAT (fake-quant) model; and its fix, qk.evaluate and the
FixedPointMonitor."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.doctor.rules import qk006_qat_evaluation as qk006
from qatkit.doctor.rules.qk006_qat_evaluation import fixed_point_evaluated
from qatkit.quantization.evaluate import FixedPointMonitor, accuracy, evaluate
from qatkit.quantization.fake_quant import fake_quants
from tests._rules import calibrate, digits, qk_warnings, trained_digits_net

BATCH = 32  # 450 test images: 15 batches per evaluation


@pytest.fixture(autouse=True)
def fresh_process_state():
    qk006.reset()
    with qk.set_march("nash-e"):
        yield
    qk006.reset()


def _qat_model() -> nn.Module:
    """The documented flow: calibrate, then a QAT model that loads the calibration."""
    d = digits()
    model = trained_digits_net()
    calib = calibrate(qk.prepare(model, d.x_train[:8], qconfig=qk.default_calibration_qconfig()),
                      d.x_train)
    qat = qk.prepare(model, d.x_train[:8], qconfig=qk.default_qat_qconfig())
    qat.load_state_dict(calib.state_dict())
    return qat


def _train_epoch(qat: nn.Module, opt: torch.optim.Optimizer) -> None:
    d = digits()
    qat.train()
    qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
    for i in range(0, len(d.x_train), 128):
        opt.zero_grad()
        nn.functional.cross_entropy(qat(d.x_train[i:i + 128]), d.y_train[i:i + 128]).backward()
        opt.step()


def _val_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    d = digits()
    return [(d.x_test[i:i + BATCH], d.y_test[i:i + BATCH]) for i in range(0, len(d.y_test), BATCH)]


def test_monitoring_the_qat_model_warns_once():
    qat = _qat_model()
    opt = torch.optim.SGD(qat.parameters(), 1e-3, momentum=0.9)
    codes: list[str] = []
    for _ in range(3):
        _train_epoch(qat, opt)
        qat.eval()
        qk.set_fake_quantize(qat, qk.FakeQuantState.VALIDATION)
        with qk_warnings() as caught, torch.no_grad():
            correct = sum(int((qat(x).argmax(1) == y).sum()) for x, y in _val_batches())
        codes += caught
        assert correct / len(digits().y_test) > 0.5
    assert codes == ["QK006"]  # at the first evaluation of epoch 2, once per model
    assert not fixed_point_evaluated()


def test_a_short_sanity_check_of_the_calibrated_model_is_fine():
    d = digits()
    calib = calibrate(qk.prepare(trained_digits_net(), d.x_train[:8],
                                 qconfig=qk.default_calibration_qconfig()), d.x_train)
    with qk_warnings() as codes:
        assert accuracy(calib(d.x_test), d.y_test) > 0.5  # one batch
    assert codes == []


def test_fixed_point_monitor_and_evaluate_are_the_fix():
    qat = _qat_model()
    opt = torch.optim.SGD(qat.parameters(), 1e-3, momentum=0.9)
    monitor = FixedPointMonitor(_val_batches())
    with qk_warnings() as codes:
        for _ in range(3):
            _train_epoch(qat, opt)
            rec = monitor.step(qat)
            assert qat.training  # the training state is restored
            assert all(fq.state is qk.FakeQuantState.QAT for _, fq in
                       fake_quants(qat))
            # and the QAT model may still be checked on the side
            qat.eval()
            qk.set_fake_quantize(qat, qk.FakeQuantState.VALIDATION)
            with torch.no_grad():
                for x, _ in _val_batches():
                    qat(x)
        final = evaluate(qat, _val_batches())
    assert codes == []
    assert len(monitor.history) == 3 and monitor.gaps == [r.gap for r in monitor.history]
    assert abs(rec.gap) < 0.1 and final > 0.5
    # evaluate measures the converted model exactly as a manual conversion would
    d = digits()
    quantized = qk.convert(qat)
    with torch.no_grad():
        assert final == pytest.approx(accuracy(quantized(d.x_test), d.y_test), abs=1e-6)
    assert monitor.worst() is max(monitor.history, key=lambda r: r.gap)


def test_evaluate_rejects_float_models_and_one_shot_monitor_batches():
    with pytest.raises(qk.QatkitError, match=r"^\[QK000\] evaluate needs a prepared"):
        evaluate(trained_digits_net(), _val_batches())
    with pytest.raises(qk.QatkitError, match=r"^\[QK000\] FixedPointMonitor needs re-iterable"):
        FixedPointMonitor(iter(_val_batches()))


def _eval_full(model: nn.Module) -> float:
    d = digits()
    if fake_quants(model):
        model.eval()
        qk.set_fake_quantize(model, qk.FakeQuantState.VALIDATION)
    with torch.no_grad():
        return accuracy(model(d.x_test), d.y_test)  # one full-batch evaluation


def test_eval_mode_only_per_epoch_full_batch_warns_and_never_says_train():
    """A full-batch evaluation per epoch in eval() mode, back to train(); the warning comes
    in epoch 2 and says nothing about train()."""
    qat = _qat_model()
    opt = torch.optim.SGD(qat.parameters(), 1e-3, momentum=0.9)
    with pytest.warns(qk.QatkitWarning) as rec:
        for _ in range(3):
            _train_epoch(qat, opt)
            assert _eval_full(qat) > 0.5
    assert [w.message.code for w in rec] == ["QK006"]
    msg = str(rec[0].message)
    assert "model.train()" not in msg and "qk.evaluate" in msg and "1 of the 1 epoch" in msg
    # qat.eval() alone (QAT state, eval mode: validation) is an evaluation too
    qk006.reset()
    with pytest.warns(qk.QatkitWarning) as rec:
        for _ in range(2):
            _train_epoch(qat, opt)
            qat.eval()
            _eval_full_raw(qat)
    assert [w.message.code for w in rec] == ["QK006"]


def _eval_full_raw(model: nn.Module) -> None:
    with torch.no_grad():
        model(digits().x_test)


def test_an_early_smoke_test_convert_does_not_silence_it():
    qat = _qat_model()
    opt = torch.optim.SGD(qat.parameters(), 1e-3, momentum=0.9)
    _eval_full(qk.convert(qat))  # smoke test, before training
    with qk_warnings() as codes:
        for _ in range(3):
            _train_epoch(qat, opt)
            qat.eval()
            _eval_full(qat)
    assert codes == ["QK006"]


def test_fixed_point_evaluated_each_epoch_is_fine_per_model():
    qat, other = _qat_model(), _qat_model()
    opt = torch.optim.SGD(qat.parameters(), 1e-3, momentum=0.9)
    opt2 = torch.optim.SGD(other.parameters(), 1e-3, momentum=0.9)
    with qk_warnings() as codes:
        for _ in range(3):
            _train_epoch(qat, opt)
            _train_epoch(other, opt2)
            qat.eval()
            _eval_full(qat)
            _eval_full(qk.convert(qat))  # the user also evaluates the fixed-point model
            other.eval()
            _eval_full(other)  # ...but only the fake-quant model of this one
    assert codes == ["QK006"]
    assert fixed_point_evaluated()
