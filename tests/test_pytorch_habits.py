"""PyTorch habits: train()/eval() drive QAT and validation; checkpoints reload from the float
architecture alone."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qatkit as qk
from qatkit.base import hooks
from qatkit.demo.recipe import calibration_batches, centered
from qatkit.quantization.fake_quant import fake_quants


class DropNet(nn.Module):
    """Conv-BN-ReLU, dropout (so train/eval really differ), linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = qk.QuantStub()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(32, 10)
        self.dequant = qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn(self.conv(self.quant(x)))))
        return self.dequant(self.fc(self.drop(torch.flatten(x, 1))))


def _accuracy(model, x, y):
    with torch.no_grad():
        out = model(x)
    return float((out.argmax(1) == y).float().mean()), out


def _batches(digits, n=1024, bs=32):
    x, y = centered(digits.x_train[:n]), digits.y_train[:n]
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


@pytest.mark.parametrize("calibrated", [False, True])
def test_standard_loop_runs_qat_and_validation(digits, calibrated):
    torch.manual_seed(0)
    x_val, y_val = centered(digits.x_test[:200]), digits.y_test[:200]
    seen: list[tuple[nn.Module, bool]] = []
    listener = hooks.listen("train_mode", lambda model, training: seen.append((model, training)))
    try:
        with qk.set_march("nash-e"):
            example = centered(digits.x_train[:2])
            qat = qk.prepare(DropNet(), example, qconfig=qk.default_qat_qconfig())
            if calibrated:
                calib = qk.prepare(DropNet(), example, qconfig=qk.default_calibration_qconfig())
                qk.calibrate(calib, calibration_batches(digits, n=256))
                qat.load_state_dict(calib.state_dict())
            opt = torch.optim.SGD(qat.parameters(), lr=0.1, momentum=0.9)
            for _epoch in range(2):
                qat.train()  # the only mode calls: no qatkit call in the loop
                for x, y in _batches(digits):
                    opt.zero_grad()
                    F.cross_entropy(qat(x), y).backward()
                    opt.step()
                qat.eval()
                acts = [fq for _, fq in fake_quants(qat) if not fq.is_weight]
                scales = [fq.scale.clone() for fq in acts]
                acc, out = _accuracy(qat, x_val, y_val)
                acc2, out2 = _accuracy(qat, x_val.flip(0), y_val.flip(0))  # other data
                # eval() froze every activation scale: validation observes nothing (weight
                # scales are those of the current weights, in every state)
                assert all(torch.equal(s, fq.scale) for s, fq in zip(scales, acts))
                assert torch.equal(out, out2.flip(0)) and acc == acc2
                ref = copy.deepcopy(qat)
                qk.set_fake_quantize(ref, qk.FakeQuantState.VALIDATION)
                ref_acc, ref_out = _accuracy(ref, x_val, y_val)
                assert torch.equal(out, ref_out) and acc == ref_acc
            assert all(fq.state is qk.FakeQuantState.QAT for _, fq in fake_quants(qat))
            assert all(fq.active_state is qk.FakeQuantState.VALIDATION
                       for _, fq in fake_quants(qat))
            assert acc > 0.4, acc
            # train() is QAT again: uncalibrated scales follow their observers
            qat.train()
            assert all(fq.active_state is qk.FakeQuantState.QAT for _, fq in fake_quants(qat))
    finally:
        hooks._listeners["train_mode"].remove(listener)
    # each mode change of the prepared model was announced once (the doctor listens)
    assert [t for m, t in seen if m is qat] == [False, True, False, True]


def test_validation_state_under_train_is_qat(digits):
    with qk.set_march("nash-e"):
        calib = qk.prepare(DropNet(), centered(digits.x_train[:2]),
                           qconfig=qk.default_calibration_qconfig())
        qk.calibrate(calib, calibration_batches(digits, n=256))
    assert all(fq.state is qk.FakeQuantState.VALIDATION for _, fq in fake_quants(calib))
    calib.train()
    assert all(fq.active_state is qk.FakeQuantState.QAT for _, fq in fake_quants(calib))
    calib(centered(digits.x_train[:8]))  # runs: no mode trap


# ---------------------------------------------------------------- reload from the float model

_CHILD = """
import sys, torch
import qatkit as qk
from qatkit.demo.recipe import DemoNet
x = torch.load(sys.argv[2], weights_only=True)
q = qk.load_quantized(DemoNet(10, width=8), sys.argv[1], x[:2])
torch.save(q(x), sys.argv[3])
"""


def test_fixed_point_checkpoint_reloads_from_the_float_class_alone(digits, tmp_path):
    import subprocess
    import sys

    from qatkit.demo.recipe import DemoNet
    from qatkit.quantization import checkpoint
    torch.manual_seed(0)
    x = centered(digits.x_test[:64])
    with qk.set_march("bayes"):
        calib = qk.prepare(DemoNet(10, width=8), x[:2], qconfig=qk.default_calibration_qconfig())
        qk.calibrate(calib, calibration_batches(digits, n=256))
        fixed = qk.convert(calib)
    want = fixed(x)
    checkpoint.save(fixed, tmp_path / "q.pt")
    torch.save(x, tmp_path / "x.pt")
    # a fresh process that knows only the float class (and no march)
    r = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "q.pt"),
                        str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert torch.equal(got, want)  # bit-identical
    # calibrated checkpoints likewise (in process), and the stages are not mixed up
    checkpoint.save(calib, tmp_path / "c.pt")
    again = qk.load_prepared(DemoNet(10, width=8), tmp_path / "c.pt", x[:2])
    assert torch.equal(again.eval()(x), calib.eval()(x))
    with pytest.raises(qk.QatkitError, match="load_quantized"):
        qk.load_prepared(DemoNet(10, width=8), tmp_path / "q.pt", x[:2])
    with pytest.raises(qk.QatkitError, match="load_prepared"):
        qk.load_quantized(DemoNet(10, width=8), tmp_path / "c.pt", x[:2])


def test_float_state_dict_into_a_prepared_model_is_refused(digits):
    from qatkit.demo.recipe import DemoNet
    net = DemoNet(10, width=8)
    with qk.set_march("nash-e"):
        qat = qk.prepare(net, centered(digits.x_train[:2]), qconfig=qk.default_qat_qconfig())
        before = {k: v.clone() for k, v in qat.state_dict().items()
                  if isinstance(v, torch.Tensor)}
        for strict in (True, False):
            with pytest.raises(qk.QatkitError, match=r"no qatkit metadata.*BN-folded"):
                qat.load_state_dict(net.state_dict(), strict=strict)
        assert all(torch.equal(v, qat.state_dict()[k]) for k, v in before.items())  # untouched
        with torch.no_grad():
            qat(centered(digits.x_train[:16]))  # QAT: scales from one batch
        fixed = qk.convert(qat)
        with pytest.raises(qk.QatkitError, match="integer"):
            fixed.load_state_dict(net.state_dict(), strict=False)
    qat.load_state_dict(qat.state_dict())  # a qatkit state_dict loads as before


def test_prepare_warnings_once_for_the_documented_two_prepares(digits):
    import warnings

    from qatkit.demo.recipe import DemoNet

    class Spare(DemoNet):
        def __init__(self) -> None:
            super().__init__(10, width=8)
            self.loss = nn.CrossEntropyLoss()  # a loss with a qconfig: QK001 at prepare

    net, x = Spare(), centered(digits.x_train[:2])
    with warnings.catch_warnings(record=True) as log, qk.set_march("nash-e"):
        warnings.simplefilter("always")
        qk.prepare(net, x, qconfig=qk.default_calibration_qconfig())
        qk.prepare(net, x, qconfig=qk.default_qat_qconfig())
        qk.prepare(Spare(), x, qconfig=qk.default_qat_qconfig())  # another model: shown again
    codes = [w.message.code for w in log if isinstance(w.message, qk.QatkitWarning)]
    assert codes.count("QK001") == 2, codes
    assert all(w.filename == __file__ for w in log)  # still pointing at the user's line


def test_calibration_and_fixed_point_do_not_depend_on_the_thread_count(digits):
    """Float training is not bit-reproducible across thread counts in torch (the split of a
    conv or GEMM reduction over threads changes the float rounding); from a given float model
    on, calibration statistics are order-independent and the integer model is exact, so the
    scales and every fixed-point output are the same for any thread count."""
    from qatkit.demo.recipe import DemoNet
    torch.manual_seed(0)
    net, x = DemoNet(10, width=8), centered(digits.x_test[:128])
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with qk.set_march("nash-e"):
            calib = qk.prepare(net, x[:2], qconfig=qk.default_calibration_qconfig())
            qk.calibrate(calib, calibration_batches(digits, n=256))
            fixed = qk.convert(calib)
        results.append(([fq.scale.clone() for _, fq in fake_quants(calib)], fixed(x)))
    torch.set_num_threads(1)
    (s1, y1), (s2, y2) = results
    assert all(torch.equal(a, b) for a, b in zip(s1, s2)) and torch.equal(y1, y2)


def test_evaluate_is_an_exact_fraction_and_low_precision_is_refused(digits):
    from qatkit.demo.recipe import DemoNet
    x, y = centered(digits.x_test[:100]), digits.y_test[:100]
    with qk.set_march("nash-e"):
        calib = qk.prepare(DemoNet(10, width=8), x[:2], qconfig=qk.default_calibration_qconfig())
        qk.calibrate(calib, calibration_batches(digits, n=128))
        acc = qk.evaluate(calib, [(x[:30], y[:30]), (x[30:], y[30:])])
    hits = int((qk.convert(calib)(x).argmax(1) == y).sum())
    assert acc == hits / 100  # e.g. 0.72, not 0.7200000286102295
    qat = copy.deepcopy(calib).train().to(torch.bfloat16)
    with pytest.raises(qk.QatkitError, match=r"bfloat16 tensor.*float32"):
        qat(x[:2])
    with pytest.raises(qk.QatkitError, match=r"bfloat16 tensor"):
        qat(x[:2].bfloat16())
