"""Correct programs of the same kinds: no error, no warning."""

from __future__ import annotations

import torch
import torch.nn as nn

import qatkit as qk
from tests.doctor_cases import case
from tests.doctor_cases._models import DigitsNet, Heads, calibrated, digits, photos, x8
from tests.doctor_cases.qk004_to_qk006 import CameraNet, _calibrate_on, _prepared, _qat, _train
from tests.doctor_cases.qk007_to_qk009 import _run


@case(None, "qatkit")
def calibrate_convert_evaluate():
    d = digits()
    with qk.set_march("nash-e"):
        calib = calibrated()
        acc = qk.evaluate(calib, [(d.x_test, d.y_test)])
        assert acc > 0.8
        return qk.doctor.check(qk.convert(calib), x8())


@case(None, "torch.ao eager")
def torch_ao_stubs_and_functional():
    from torch.ao.quantization import DeQuantStub, QuantStub

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.conv, self.bn, self.relu = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), \
                nn.ReLU()
            self.skip = torch.ao.nn.quantized.FloatFunctional()
            self.fc = nn.Linear(8 * 64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.relu(self.bn(self.conv(self.quant(x))))
            return self.dequant(self.fc(self.skip.add(y, y).flatten(1)))
    with qk.set_march("nash-e"):
        m = Net().eval()
        m.qconfig = qk.default_qat_qconfig()
        return qk.doctor.check(m, x8())


@case(None, "qatkit")
def top_level_sequential():
    m = nn.Sequential(qk.QuantStub(), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10), qk.DeQuantStub()).eval()
    with qk.set_march("nash-e"):
        quantized = qk.convert(calibrated(m))
        _run(quantized)
        return qk.doctor.check(quantized, x8())


@case(None, "torchvision")
def torchvision_quantizable_resnet18():
    from tests._tv_import import torchvision
    torchvision()
    from torchvision.models.quantization import resnet18
    with qk.set_march("nash-e"):
        return qk.doctor.check(resnet18(weights=None, quantize=False).eval(),
                               torch.rand(1, 3, 32, 32))


@case(None, "torchvision")
def torchvision_blocks_with_unused_skip_add():
    """torchvision's inverted residual creates skip_add even where it has no residual."""
    from tests._tv_import import torchvision
    torchvision()
    from torchvision.models.quantization.mobilenetv2 import QuantizableInvertedResidual
    blocks = nn.Sequential(QuantizableInvertedResidual(8, 16, 2, 2),
                           QuantizableInvertedResidual(16, 16, 1, 2))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
            self.stem, self.blocks = nn.Conv2d(3, 8, 3, padding=1), blocks
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.pool(self.blocks(self.stem(self.quant(x))))
            return self.dequant(self.fc(f.flatten(1)))
    with qk.set_march("nash-e"):
        return qk.doctor.check(Net().eval(), torch.rand(1, 3, 16, 16))


@case(None, "qatkit")
def camera_yuv_photos_on_j6e():
    from qatkit.base.colour import rgb_to_yuv444
    _calibrate_on(CameraNet(), rgb_to_yuv444(photos(), centered=True).float() / 128,
                  processor="J6E", input_source="camera")


@case(None, "qatkit")
def rgb_model_with_a_calibrated_stub_on_j6e():
    _calibrate_on(CameraNet(scale=None), photos().float() / 255, processor="J6E")


@case(None, "loops")
def qat_loop_with_the_fixed_point_monitor():
    d = digits()
    qat, opt = _qat()
    monitor = qk.FixedPointMonitor([(d.x_test[:128], d.y_test[:128])])
    with qk.set_march("nash-e"):
        for _ in range(3):
            _train(qat, opt)
            monitor.step(qat)


@case(None, "loops")
def qat_loop_evaluating_both_models_in_eval_mode():
    d = digits()
    qat, opt = _qat()
    with qk.set_march("nash-e"):
        for _ in range(3):
            _train(qat, opt)
            qat.eval()
            qk.set_fake_quantize(qat, qk.FakeQuantState.VALIDATION)
            with torch.no_grad():
                qat(d.x_test)  # the QAT model on the side...
            qk.evaluate(qat, [(d.x_test, d.y_test)])  # ...and the fixed-point model


def rank0_calibrates_alone(rank: int, world: int) -> str:
    import torch.distributed as dist

    from tests.doctor_cases import observe
    torch.set_num_threads(1)

    def job():
        with qk.set_march("nash-e"):
            if rank == 0:  # the unwrapped model, one process; the others wait
                qk.convert(qk.calibrate(_prepared(), digits().x_train[:128].split(64)))
            dist.barrier()
    return ",".join(observe(job).codes)


@case(None, "multi-process", slow=True)  # two processes: ~10 s on an idle machine
def rank_zero_calibrates_alone_in_a_job():
    from qatkit.distributed.launch import spawn
    codes = spawn(rank0_calibrates_alone, 2, threads=1)
    assert codes == ["", ""], codes


@case(None, "nested submodules")
def heads_dequantized_separately():
    with qk.set_march("nash-e"):
        return qk.doctor.check(calibrated(Heads().eval()), x8())


@case(None, "qatkit")
def sigmoid_after_the_dequant():
    class Net(DigitsNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(super().forward(x))
    with qk.set_march("nash-e"):
        return qk.doctor.check(calibrated(Net().eval()), x8())


@case(None, "helper method")
def deploy_wrapper_with_float_postprocessing():
    class Deploy(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m, self.soft, self.cat = m, nn.Softmax(1), qk.FloatFunctional()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.m(x)
            return self.cat.cat([self.soft(y), y], 1)  # on floats, after the DeQuantStub
    with qk.set_march("nash-e"):
        d = Deploy(qk.convert(calibrated()))
        _run(d)
        return qk.doctor.check(d, x8())


@case(None, "torch.ao eager")
def loss_member_with_qconfig_none():
    from tests.doctor_cases.qk001_to_qk003 import _WithLoss
    m = _WithLoss().eval()
    m.qconfig = qk.default_qat_qconfig()
    m.criterion.qconfig = None
    with qk.set_march("nash-e"):
        return qk.doctor.check(m, x8())


@case(None, "loops")
def healthy_history_and_one_floatfunctional_per_iteration():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
            self.adds = nn.ModuleList(qk.FloatFunctional() for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(self.quant(x))
            for conv, add in zip(self.convs, self.adds):
                x = add.add(x, conv(x))
            return self.dequant(x.flatten(1))
    rows = [{"train_acc": 0.8 + 0.03 * e, "val_acc": 0.79 + 0.03 * e} for e in range(5)]
    with qk.set_march("nash-e"):
        qk.prepare(Net().eval(), x8(), qconfig=qk.default_qat_qconfig(), history=rows)


@case(None, "qatkit")
def processor_declared_and_matching():
    with qk.set_march(processor="J6M"):
        calib = calibrated()
        return qk.doctor.check(calib, x8(), processor="J6M")


@case(None, "qatkit")
def colour_converter_added_after_convert():
    from qatkit.base.colour import rgb_to_yuv444
    x = rgb_to_yuv444(photos(), centered=True).float() / 128
    calib = _calibrate_on(CameraNet(), x, input_source="camera", processor="J6E")
    with qk.set_march("nash-e"):
        quantized = qk.convert(calib)
        with torch.no_grad():
            quantized(x)
