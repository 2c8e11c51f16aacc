"""The float -> calibration -> QAT -> fixed-point workflow and its usage errors."""

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.demo.recipe import DemoNet, accuracy, calibration_batches, centered, train
from qatkit.quantization import checkpoint
from qatkit.quantization.calibrate import calibrate
from qatkit.quantization.qat import QATConv2d, QATLinear


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = DemoNet(10, width=16)
    train(m, digits, epochs=4, lr=3e-3, seed=0, quiet=True)
    return m


def _example(digits):
    return centered(digits.x_train[:2])


def _calibrated(model, digits, qconfig=None):
    calib = qk.prepare(model, _example(digits), qconfig=qconfig or qk.default_calibration_qconfig())
    return calibrate(calib, calibration_batches(digits, n=512))


def test_march_by_name_processor_and_context():
    with qk.set_march(processor="J6E"):
        assert qk.get_march().name == "nash-e"
        with qk.set_march("bayes"):
            assert qk.get_march().name == "bayes"
        assert qk.get_march().name == "nash-e"
    assert qk.get_march() is None
    with pytest.raises(qk.QatkitError, match=r"\[QK002\].*unknown march.*nash-e.*J6E"):
        qk.set_march("nash-x")


def test_prepare_without_march_is_an_error(trained, digits):
    with pytest.raises(qk.QatkitError, match=r"\[QK002\] no march is set"):
        qk.prepare(trained, _example(digits), qconfig=qk.default_qat_qconfig())


def test_prepare_does_not_modify_the_float_model(trained, digits):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    with qk.set_march("nash-e"):
        qk.prepare(trained, _example(digits), qconfig=qk.default_qat_qconfig())
    after = trained.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prepare_swaps_and_enables_high_precision_output(trained, digits):
    with qk.set_march("nash-e"):
        qat = qk.prepare(trained, _example(digits), qconfig=qk.default_qat_qconfig())
    assert isinstance(qat.conv1, QATConv2d) and qat.conv1.activation == "relu"
    assert isinstance(qat.bn1, nn.Identity)  # folded
    assert qat.conv3.output_mode == "accumulator"  # conv+add fusion
    assert qat.skip.fused_activation == "relu"
    assert isinstance(qat.fc, QATLinear) and qat.fc.output_mode == "high_precision"
    assert qat.fc.activation_post_process is None
    assert qat.qatkit_meta.march == "nash-e"


def test_calibration_needs_eval_and_says_why(trained, digits):
    with qk.set_march("nash-e"):
        calib = qk.prepare(trained, _example(digits), qconfig=qk.default_calibration_qconfig())
    calib.train()
    with pytest.raises(qk.QatkitError, match=r"CALIBRATION needs the model in eval\(\)"):
        qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
    calib.eval()
    qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
    calib.train()  # switched back after setting the state: caught at the next forward
    with pytest.raises(qk.QatkitError, match=r"needs the model in eval\(\).*dropout"):
        calib(_example(digits))


def test_calibration_without_data_is_an_error(trained, digits):
    with qk.set_march("nash-e"):
        calib = qk.prepare(trained, _example(digits), qconfig=qk.default_calibration_qconfig())
        with pytest.raises(qk.QatkitError, match=r"\[QK008\] calibration received no data"):
            calibrate(calib, [])


def test_fixed_point_model_is_integer_and_close_to_float(trained, digits):
    with qk.set_march("nash-e"):
        calib = _calibrated(trained, digits)
        fixed = qk.convert(calib)
    x = centered(digits.x_test[:8])
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o))
             for n, m in fixed.named_modules() if n in ("conv1", "conv2", "skip", "pool", "fc")]
    out = fixed(x)
    for h in hooks:
        h.remove()
    assert all(isinstance(o, qk.QTensor) for o in seen)
    assert {o.q.dtype for o in seen} <= {torch.int8, torch.int32}
    assert out.dtype == torch.float32
    assert accuracy(fixed, digits.x_test, digits.y_test) >= accuracy(
        trained, digits.x_test, digits.y_test) - 0.03


def test_qat_after_calibration_keeps_calibrated_activation_scales(trained, digits):
    with qk.set_march("nash-e"):
        calib = _calibrated(trained, digits)
        qat = qk.prepare(trained, _example(digits), qconfig=qk.default_qat_qconfig())
    qat.load_state_dict(calib.state_dict())
    s0 = qat.skip.activation_post_process.scale.clone()
    qat.train()
    qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
    train(qat, digits, epochs=1, lr=1e-3, seed=1, quiet=True, sgd=True)
    assert torch.equal(qat.skip.activation_post_process.scale, s0)
    # weight scales follow the weights of the step that uses them
    qat(_example(digits))
    w = qat.conv2.weight.detach()
    expected = (w.abs().flatten(1).amax(1) / 127.5).clamp_min(2.0**-40)
    assert torch.equal(qat.conv2.weight_fake_quant.scale, expected)


def test_checkpoints_round_trip_all_stages(trained, digits, tmp_path):
    with qk.set_march("nash-e"):
        calib = _calibrated(trained, digits)
        fixed = qk.convert(calib)
        checkpoint.save(calib, tmp_path / "calib.pt")
        checkpoint.save(fixed, tmp_path / "fixed.pt")
        calib2 = qk.prepare(trained, _example(digits), qconfig=qk.default_calibration_qconfig())
        checkpoint.load(calib2, tmp_path / "calib.pt")
        fixed2 = qk.convert(calib2)
        checkpoint.load(fixed2, tmp_path / "fixed.pt")
    for a, b in ((calib, calib2), (fixed, fixed2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
    x = centered(digits.x_test[:16])
    assert torch.equal(fixed(x), fixed2(x))


def test_checkpoint_of_another_march_or_structure_is_refused(trained, digits, tmp_path):
    with qk.set_march("nash-e"):
        calib = _calibrated(trained, digits)
    checkpoint.save(calib, tmp_path / "calib.pt")
    with qk.set_march("bayes"):
        other = qk.prepare(trained, _example(digits), qconfig=qk.default_calibration_qconfig())
        with pytest.raises(qk.QatkitError, match=r"\[QK002\].*made for march 'nash-e'"):
            checkpoint.load(other, tmp_path / "calib.pt")
    with qk.set_march("nash-e"):
        wider = qk.prepare(DemoNet(10, width=8), _example(digits),
                           qconfig=qk.default_calibration_qconfig())
        with pytest.raises(qk.QatkitError, match=r"\[QK000\].*do not fit"):
            checkpoint.load(wider, tmp_path / "calib.pt")
    with pytest.raises(qk.QatkitError, match="does not exist"):
        checkpoint.load(calib, tmp_path / "missing.pt")


def test_torch_ao_eager_model_is_accepted(digits):
    from torch.ao.nn.quantized import FloatFunctional
    from torch.ao.quantization import DeQuantStub, QuantStub

    class AoNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.add = FloatFunctional()
            self.fc = nn.Linear(8 * 64, 10)

        def forward(self, x):
            x = self.quant(x)
            y = self.relu(self.bn(self.conv(x)))
            y = self.add.add(y, y)
            return self.dequant(self.fc(y.flatten(1)))

    m = AoNet().eval()
    with qk.set_march("nash-e"):
        calib = _calibrated(m, digits)
        fixed = qk.convert(calib)
    assert isinstance(calib.quant, qk.QuantStub) and isinstance(calib.add, qk.FloatFunctional)
    x = centered(digits.x_test[:4])
    assert (fixed(x) - m(x)).abs().max() < 0.5


def test_unsupported_module_names_module_and_type(digits):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
            self.conv = nn.Conv2d(1, 4, 3)
            self.norm = nn.LocalResponseNorm(2)

        def forward(self, x):
            return self.dequant(self.norm(self.conv(self.quant(x))))

    with qk.set_march("nash-e"), pytest.raises(qk.QatkitError, match=r"norm.*LocalResponseNorm"):
        qk.prepare(Odd(), _example(digits), qconfig=qk.default_qat_qconfig())
