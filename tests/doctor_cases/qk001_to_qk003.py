"""QK001 qconfig outside the region, QK002 march, QK003 high-precision output."""

from __future__ import annotations

import torch
import torch.nn as nn

import qatkit as qk
from tests.doctor_cases import case
from tests.doctor_cases._models import DigitsNet, Heads, calibrated, trained_digits_net, x8


# ---- QK001 -----------------------------------------------------------------------------------
class _WithLoss(nn.Module):
    """torch.ao eager style: torch.ao stubs, the loss kept as a member, one global qconfig."""

    def __init__(self) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv, self.relu = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(8 * 64, 10)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.relu(self.conv(self.quant(x))).flatten(1)))


@case("QK001", "torch.ao eager")
def loss_member_with_global_qconfig():
    m = _WithLoss().eval()
    m.qconfig = qk.default_qat_qconfig()
    with qk.set_march("nash-e"):
        return qk.doctor.check(m, x8())


class _PreNorm(nn.Module):
    """A standalone BatchNorm2d normalising the input before the QuantStub."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(1)
        self.net = DigitsNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


@case("QK001", "nested submodules")
def batchnorm_preprocessing_before_the_stub():
    with qk.set_march("nash-e"):
        qk.prepare(_PreNorm().eval(), x8(), qconfig=qk.default_qat_qconfig())


class _Post(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = DigitsNet()
        self.post = nn.Sequential(nn.Linear(10, 10), nn.Softmax(1))  # float decoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.net(x))


@case("QK001", "qatkit")
def postprocessing_after_the_dequant_with_qconfig():
    with qk.set_march("nash-e"):
        return qk.doctor.check(_Post().eval(), x8(), qconfig=qk.default_qat_qconfig())


@case("QK001", "helper method")
def preprocessing_conv_in_a_helper():
    class Net(DigitsNet):
        def __init__(self) -> None:
            super().__init__()
            self.blur = nn.Conv2d(1, 1, 3, padding=1)

        def prep(self, x: torch.Tensor) -> torch.Tensor:
            return self.blur(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(self.prep(x))
    with qk.set_march("nash-e"):
        qk.prepare(Net().eval(), x8(), qconfig=qk.default_qat_qconfig())


@case("QK001", "torchvision")
def torchvision_resnet_with_its_criterion():
    from tests._tv_import import torchvision
    torchvision()
    from torchvision.models.quantization import resnet18
    m = resnet18(weights=None, quantize=False).eval()
    m.criterion = nn.CrossEntropyLoss()
    m.qconfig = qk.default_qat_qconfig()
    with qk.set_march("nash-e"):
        return qk.doctor.check(m, torch.rand(1, 3, 32, 32))


# ---- QK002 -----------------------------------------------------------------------------------
@case("QK002", "qatkit")
def no_march_at_prepare():
    qk.prepare(trained_digits_net(), x8())


@case("QK002", "qatkit")
def march_is_not_the_processors():
    with qk.set_march("bayes"):
        qk.prepare(trained_digits_net(), x8(), processor="J6E")


@case("QK002", "loops")
def march_changed_before_convert():
    with qk.set_march("nash-e"):
        calib = calibrated()
    with qk.set_march("bayes"):
        qk.convert(calib)


@case("QK002", "torch.ao eager")
def checkpoint_of_another_march():
    with qk.set_march("nash-e"):
        state = calibrated().state_dict()
    with qk.set_march("bayes"):
        qk.prepare(trained_digits_net(), x8(),
                   qconfig=qk.default_calibration_qconfig()).load_state_dict(state)


@case("QK002", "qatkit")
def prepared_for_bayes_checked_for_j6m():
    with qk.set_march("bayes"):
        calib = calibrated()
    return qk.doctor.check(calib, x8(), processor="J6M")


# ---- QK003 -----------------------------------------------------------------------------------
@case("QK003", "qatkit")
def hand_made_qconfig_without_high_precision():
    q = qk.QConfig(qk.QuantSpec("qint8", "mse"), qk.QuantSpec(per_channel=True),
                   high_precision_output=False)
    with qk.set_march("nash-e"):
        qk.prepare(DigitsNet().eval(), x8(), qconfig=q)


@case("QK003", "qatkit")
def output_returned_without_dequant():
    class Net(DigitsNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x))  # the DeQuantStub is forgotten
    with qk.set_march("nash-e"):
        return qk.doctor.check(Net().eval(), x8())


@case("QK003", "nested submodules")
def heads_concatenated_before_one_dequant():
    with qk.set_march("nash-e"):
        qk.prepare(Heads(joined=True).eval(), x8(), qconfig=qk.default_qat_qconfig())


@case("QK003", "qatkit")
def sigmoid_head_inside_the_region():
    class Net(DigitsNet):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.Sigmoid()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.act(self.fc(self.features(x))))
    with qk.set_march("nash-e"):
        calib = calibrated(Net().eval())
        return qk.doctor.check(calib, x8())


@case("QK003", "torch.ao eager")
def softmax_head_inside_the_region():
    class Net(_WithLoss):
        def __init__(self) -> None:
            super().__init__()
            del self.criterion
            self.softmax = nn.Softmax(dim=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(self.relu(self.conv(self.quant(x))).flatten(1))
            return self.dequant(self.softmax(y))
    with qk.set_march("nash-e"):
        qk.prepare(Net().eval(), x8(), qconfig=qk.default_qat_qconfig())
