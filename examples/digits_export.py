"""The digits demo net on nash-e, for `qatkit export` and `qatkit verify` (docs/export.md).

    qatkit export examples/digits_export.py:build --output digits.onnx
    qatkit verify digits.onnx examples/digits_export.py:build
    qatkit export examples/digits_export.py:build --output digits_qdq.onnx --flavour qdq
    qatkit verify digits_qdq.onnx examples/digits_export.py:build

build() trains the float net on sklearn digits (seeded, one thread: the same model every call),
calibrates and converts it, and returns the fixed-point model with the test images.
"""

import torch

import qatkit as qk
from qatkit.demo.recipe import DemoNet, calibration_batches, centered, load, train_float


def build(march: str = "nash-e", epochs: int = 8) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    split = load("digits")
    with qk.set_march(march):
        net = DemoNet(split.num_classes)
        train_float(net, split, epochs, seed=0, quiet=True)
        calib = qk.prepare(net, centered(split.x_train[:2]),
                           qconfig=qk.default_calibration_qconfig())
        qk.calibrate(calib, calibration_batches(split), progress=False)
        return qk.convert(calib), centered(split.x_test)


def build_bayes() -> tuple[torch.nn.Module, torch.Tensor]:
    return build("bayes")


def build_bernoulli() -> tuple[torch.nn.Module, torch.Tensor]:
    return build("bernoulli")
