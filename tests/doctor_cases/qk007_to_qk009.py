"""QK007 shared modules, QK008 ops added after calibration, QK009 overfitting."""

from __future__ import annotations

import torch
import torch.nn as nn

import qatkit as qk
from tests.doctor_cases import case
from tests.doctor_cases._models import DigitsNet, calibrated, digits, x8


# ---- QK007 -----------------------------------------------------------------------------------
class _Res(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.add = qk.FloatFunctional()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)

    def res(self, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        return self.add.add(x, conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.quant(x))
        if self.mode == "loop":
            for conv in self.convs:
                x = self.add.add(x, conv(x))
        elif self.mode == "helper":
            x = self.res(x, self.convs[0])
            x = self.res(x, self.convs[1])
        elif self.mode == "twice":
            x = self.add.add(x, self.convs[0](x))
            x = self.add.add(x, self.convs[1](x))
        return self.dequant(x.flatten(1))


@case("QK007", "loops")
def one_floatfunctional_in_a_loop():
    with qk.set_march("nash-e"):
        qk.prepare(_Res("loop").eval(), x8(), qconfig=qk.default_qat_qconfig())


@case("QK007", "helper method")
def one_floatfunctional_in_a_helper():
    with qk.set_march("nash-e"):
        return qk.doctor.check(_Res("helper").eval(), x8())


@case("QK007", "qatkit")
def one_floatfunctional_called_twice():
    with qk.set_march("nash-e"):
        qk.prepare(_Res("twice").eval(), x8(), qconfig=qk.default_qat_qconfig())


@case("QK007", "torch.ao eager")
def one_quantstub_for_two_inputs():
    from torch.ao.quantization import DeQuantStub, QuantStub

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
            self.cat = torch.ao.nn.quantized.FloatFunctional()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.cat.cat([self.a(self.quant(x)), self.b(self.quant(y))], 1))
    with qk.set_march("nash-e"):
        return qk.doctor.check(Net().eval(), (x8(), x8() * 0.5))


@case("QK007", "nested submodules")
def shared_conv_in_a_submodule():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.relu(self.conv(x)))

    class Net(_Res):
        def __init__(self) -> None:
            super().__init__("none")
            self.block = Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.block(self.stem(self.quant(x))).flatten(1))
    with qk.set_march("nash-e"):
        qk.prepare(Net().eval(), x8(), qconfig=qk.default_qat_qconfig())


# ---- QK008 -----------------------------------------------------------------------------------
def _run(model: nn.Module) -> None:
    with torch.no_grad():
        model(digits().x_test[:8])


@case("QK008", "qatkit")
def fc_swapped_after_calibration():
    with qk.set_march("nash-e"):
        calib = calibrated()
        calib.fc = nn.Linear(256, 10)  # a new classifier for another label set
        _run(qk.convert(calib))


@case("QK008", "torch.ao eager")
def fc_swapped_in_the_converted_model():
    with qk.set_march("nash-e"):
        quantized = qk.convert(calibrated())
        quantized.fc = nn.Linear(256, 10)
        _run(quantized)


@case("QK008", "nested submodules")
def conv_added_after_convert():
    with qk.set_march("nash-e"):
        quantized = qk.convert(calibrated())
        quantized.relu2 = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 16, 1))
        return qk.doctor.check(quantized, x8())


@case("QK008", "qatkit")
def softmax_added_inside_the_converted_region():
    with qk.set_march("nash-e"):
        quantized = qk.convert(calibrated())
        quantized.relu2 = nn.Sequential(nn.ReLU(), nn.Softmax(1))
        _run(quantized)


@case("QK008", "helper method")
def deploy_wrapper_concatenating_quantized_features():
    class Deploy(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m, self.cat = m, qk.FloatFunctional()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.m.features(x)
            return self.m.dequant(self.m.fc(self.cat.cat([f[:, :128], f[:, 128:]], 1)))
    with qk.set_march("nash-e"):
        _run(Deploy(qk.convert(calibrated())))


@case("QK008", "loops")
def head_added_after_calibration():
    class Net(DigitsNet):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(256, 10)])
            self.dq2 = qk.DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x)
            return sum(self.dq2(h(f)) for h in self.heads) + self.dequant(self.fc(f))
    with qk.set_march("nash-e"):
        calib = calibrated(Net().eval())
        calib.heads.append(nn.Linear(256, 10))  # a second head, after calibration
        _run(qk.convert(calib))


# ---- QK009 -----------------------------------------------------------------------------------
_ROWS = [{"epoch": e, "train_acc": 0.7 + 0.07 * e, "val_acc": 0.70 + 0.01 * e}
         for e in range(5)]


@case("QK009", "qatkit")
def overfitted_history_given_to_prepare():
    h = {k: [r[k] for r in _ROWS] for k in ("train_acc", "val_acc")}
    with qk.set_march("nash-e"):
        qk.prepare(DigitsNet().eval(), x8(), qconfig=qk.default_qat_qconfig(), history=h)


@case("QK009", "loops")
def per_epoch_dicts_from_a_training_loop():
    log = []
    for r in _ROWS:  # what a training loop appends each epoch
        log.append({"train_acc": r["train_acc"], "val_acc": r["val_acc"], "lr": 0.01})
    qk.check_overfitting(log)


@case("QK009", "torch.ao eager")
def keras_style_keys():
    qk.check_overfitting({"loss": [1.0, 0.5, 0.3, 0.2, 0.1, 0.05],
                          "val_loss": [1.0, 0.8, 0.7, 0.75, 0.8, 0.9]})


@case("QK009", "qatkit")
def validation_loss_rising_given_to_the_doctor():
    h = {"train_loss": [1.0, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1],
         "val_loss": [1.0, 0.7, 0.6, 0.62, 0.66, 0.7, 0.74]}
    with qk.set_march("nash-e"):
        return qk.doctor.check(DigitsNet().eval(), x8(), history=h)


@case("QK009", "torchvision")
def percent_accuracies_of_a_small_dataset():
    qk.check_overfitting({"train_acc": [60, 80, 95, 99, 100], "val_acc": [55, 70, 78, 80, 81]})
