"""``qatkit demo``: the whole workflow on real data, end to end.

float training -> calibration -> fixed point (calibrated) -> QAT -> fixed point (final), on
sklearn's digits (shipped with scikit-learn) or Fashion-MNIST (when installed), with the
accuracy of every stage. The building blocks are public so that examples, benchmarks and the
multi-process demo reuse them.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from qatkit.base.march import resolve, set_march
from qatkit.demo import data
from qatkit.quantization import checkpoint
from qatkit.quantization.calibrate import calibrate
from qatkit.quantization.convert import convert
from qatkit.quantization.fake_quant import FakeQuantState, set_fake_quantize
from qatkit.quantization.prepare import prepare
from qatkit.quantization.qconfig import default_calibration_qconfig, default_qat_qconfig
from qatkit.quantization.stubs import DeQuantStub, FloatFunctional, QuantStub


class DemoNet(nn.Module):
    """A small residual CNN written the usual way: QuantStub in, DeQuantStub out,
    a FloatFunctional for the residual add."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.skip = FloatFunctional()
        self.relu3 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv4 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.relu4 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.skip.add(self.bn3(self.conv3(y)), x))
        x = self.pool(x)
        x = self.relu4(self.bn4(self.conv4(x)))
        x = torch.flatten(self.gap(x), 1)
        return self.dequant(self.fc(x))


def centered(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> [-1, 1]: symmetric int8 then uses its whole range."""
    return x * 2.0 - 1.0


def load(dataset: str, seed: int = 0) -> data.Split:
    if dataset == "digits":
        return data.load_digits(seed=seed)
    if dataset == "fashion":
        return data.load_fashion_mnist()
    raise ValueError(f"unknown dataset {dataset!r}: use 'digits' or 'fashion'")


def _progress(it: Any, desc: str, quiet: bool) -> Any:
    if quiet:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, leave=False, file=sys.stderr)


def train(model: nn.Module, split: data.Split, epochs: int, lr: float, seed: int,
          batch_size: int = 64, quiet: bool = False, sgd: bool = False,
          step_hook: Any = None) -> list[float]:
    """Train with cross-entropy; returns the mean loss of each epoch."""
    opt: torch.optim.Optimizer = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
                                  if sgd else torch.optim.Adam(model.parameters(), lr=lr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    losses = []
    for ep in _progress(range(epochs), "train", quiet):
        model.train()
        total, n = 0.0, 0
        for x, y in data.batches(split.x_train, split.y_train, batch_size, shuffle=True,
                                 seed=seed + ep):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(centered(x)), y)
            loss.backward()
            opt.step()
            if step_hook is not None:
                step_hook()
            total, n = total + float(loss.detach()) * len(y), n + len(y)
        sched.step()
        losses.append(total / max(n, 1))
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
             ) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        out = model(centered(x[i:i + batch_size]))
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(y)


def calibration_batches(split: data.Split, n: int = 1024, batch_size: int = 128
                        ) -> Iterator[torch.Tensor]:
    x = split.x_train[:n]
    for i in range(0, len(x), batch_size):
        yield centered(x[i:i + batch_size])


# Float training per dataset: Adam suits the tiny digits set; on Fashion-MNIST's single epoch
# it stalls near 50 % with this net, where SGD with momentum reaches about 78 %.
FLOAT_RECIPES = {"digits": ("adam", 3e-3), "fashion-mnist": ("sgd", 0.05)}


def train_float(model: nn.Module, split: data.Split, epochs: int, seed: int,
                quiet: bool = False) -> list[float]:
    opt, lr = FLOAT_RECIPES.get(split.name, ("adam", 3e-3))
    return train(model, split, epochs, lr=lr, seed=seed, quiet=quiet, sgd=opt == "sgd")


def default_epochs(dataset: str, epochs: int | None, qat_epochs: int | None
                   ) -> tuple[int, int]:
    """Float and QAT epochs: digits 15 and 3, Fashion-MNIST (60k images) 1 and 1."""
    small = dataset == "digits"
    return (epochs if epochs is not None else (15 if small else 1),
            qat_epochs if qat_epochs is not None else (3 if small else 1))


def run(dataset: str = "digits", march: str = "nash-e", epochs: int | None = None,
        qat_epochs: int | None = None, seed: int = 0, save: str | None = None, quiet: bool = False
        ) -> dict[str, Any]:
    """The whole workflow; returns the figures printed by ``qatkit demo``."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    split = load(dataset, seed)
    epochs, qat_epochs = default_epochs(dataset, epochs, qat_epochs)
    example = centered(split.x_train[:2])
    with set_march(march):
        float_model = DemoNet(split.num_classes)
        train_float(float_model, split, epochs, seed, quiet)
        float_acc = accuracy(float_model, split.x_test, split.y_test)

        calib = prepare(float_model, example, qconfig=default_calibration_qconfig())
        calibrate(calib, calibration_batches(split), progress=not quiet)
        calib_fixed = convert(calib)
        calib_acc = accuracy(calib_fixed, split.x_test, split.y_test)

        qat = prepare(float_model, example, qconfig=default_qat_qconfig())
        qat.load_state_dict(calib.state_dict())
        qat.train()
        set_fake_quantize(qat, FakeQuantState.QAT)
        train(qat, split, qat_epochs, lr=1e-3, seed=seed + 1000, quiet=quiet, sgd=True)
        qat.eval()
        set_fake_quantize(qat, FakeQuantState.VALIDATION)
        qat_acc = accuracy(qat, split.x_test, split.y_test)
        quantized = convert(qat)
        quant_acc = accuracy(quantized, split.x_test, split.y_test)
        if save:  # each file atomic, all marked with this run's id (checkpoint.load_run)
            os.makedirs(save, exist_ok=True)
            run_id = uuid.uuid4().hex
            for name, m in (("float", float_model), ("calibrated", calib), ("qat", qat),
                            ("quantized", quantized)):
                checkpoint.save(m, os.path.join(save, name + ".pt"), run=run_id)
    return {
        "dataset": split.name, "march": resolve(march).name,
        "float_accuracy": float_acc, "calibration_accuracy": calib_acc,
        "qat_accuracy": qat_acc, "quantized_accuracy": quant_acc,
        "quantized_minus_float": quant_acc - float_acc, "epochs": epochs,
        "qat_epochs": qat_epochs, "train_size": len(split.y_train),
        "test_size": len(split.y_test), "seed": seed, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 2),
    }


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"qatkit demo: {r['dataset']} on {r['march']} ({r['seconds']} s)")
    t.add_column("stage")
    t.add_column("model")
    t.add_column("test accuracy", justify="right")
    t.add_row("float", "float32", f"{r['float_accuracy']:.2%}")
    t.add_row("calibrated", "fixed point", f"{r['calibration_accuracy']:.2%}")
    t.add_row("QAT", "fake quant", f"{r['qat_accuracy']:.2%}")
    t.add_row("QAT -> convert", "fixed point", f"{r['quantized_accuracy']:.2%}")
    Console().print(t)


def report_models(dataset: str = "digits", march: str = "nash-e", epochs: int | None = None,
                qat_epochs: int = 3, seed: int = 0, damage_layer: str | None = None,
                damage_factor: float = 20.0, quiet: bool = True, width: int = 32
                ) -> dict[str, Any]:
    """The digits (or Fashion-MNIST) workflow of ``qatkit demo``, returning the models:
    float training, calibration, QAT with a FixedPointMonitor per epoch, then (optionally)
    one layer's output scale damaged by ``damage_factor``."""
    from qatkit.analysis.report import damage
    from qatkit.quantization.evaluate import FixedPointMonitor
    torch.manual_seed(seed)
    split = load(dataset, seed)
    epochs = epochs if epochs is not None else (15 if dataset == "digits" else 1)
    example = centered(split.x_train[:2])
    x_test, y_test = centered(split.x_test), split.y_test
    with set_march(march):
        float_model = DemoNet(split.num_classes, width=width)
        train_float(float_model, split, epochs, seed, quiet)
        calib = prepare(float_model, example, qconfig=default_calibration_qconfig())
        calibrate(calib, calibration_batches(split))
        qat = prepare(float_model, example, qconfig=default_qat_qconfig())
        qat.load_state_dict(calib.state_dict())
        monitor = FixedPointMonitor([(x_test[i:i + 500], y_test[i:i + 500])
                                     for i in range(0, len(y_test), 500)])
        qat.train()
        set_fake_quantize(qat, FakeQuantState.QAT)
        for ep in range(qat_epochs):
            train(qat, split, 1, lr=1e-3, seed=seed + 1000 + ep, quiet=quiet, sgd=True)
            monitor.step(qat)
        qat.eval()
        set_fake_quantize(qat, FakeQuantState.VALIDATION)
        if damage_layer:
            damage(qat, damage_layer, damage_factor)
    return {"float": float_model, "quant": qat, "example_inputs": example, "label": "QAT",
            "data": (x_test, y_test), "monitor": monitor, "march": march,
            "calibration": list(calibration_batches(split)), "dataset": split.name}
