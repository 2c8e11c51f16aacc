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
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from qatkit.base.march import resolve, set_march
from qatkit.demo import data
from qatkit.quantization import checkpoint
from qatkit.quantization.calibrate import calibrate
from qatkit.quantization.consistency import set_consistency_level
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


class FashionNet(nn.Module):
    """The Fashion-MNIST demo's net: five conv-BN-ReLU layers (two with stride 2, so most of
    the work runs at 14x14 and 7x7), a residual add, global average pooling and a linear head;
    ``width``-2w-2w-2w-4w channels."""

    def __init__(self, num_classes: int = 10, width: int = 24) -> None:
        super().__init__()
        w = width
        self.quant = QuantStub()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, w, 3, 1, 1, bias=False), \
            nn.BatchNorm2d(w), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False), \
            nn.BatchNorm2d(2 * w), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(2 * w, 2 * w, 3, 1, 1, bias=False), \
            nn.BatchNorm2d(2 * w), nn.ReLU()
        self.conv4, self.bn4 = nn.Conv2d(2 * w, 2 * w, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * w)
        self.skip = FloatFunctional()
        self.relu4 = nn.ReLU()
        self.conv5, self.bn5, self.relu5 = nn.Conv2d(2 * w, 4 * w, 3, 2, 1, bias=False), \
            nn.BatchNorm2d(4 * w), nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        y = self.relu3(self.bn3(self.conv3(x)))
        x = self.relu4(self.skip.add(self.bn4(self.conv4(y)), x))
        x = self.relu5(self.bn5(self.conv5(x)))
        return self.dequant(self.fc(torch.flatten(self.gap(x), 1)))


def demo_net(split: data.Split, width: int | None = None) -> nn.Module:
    """DemoNet for digits (8x8), FashionNet for Fashion-MNIST (28x28)."""
    if split.name == "fashion-mnist":
        return FashionNet(split.num_classes, width or 24)
    return DemoNet(split.num_classes, width or 32)


def centered(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> [-1, 1]: symmetric int8 then uses its whole range."""
    return x * 2.0 - 1.0


def load(dataset: str, seed: int = 0) -> data.Split:
    if dataset == "digits":
        return data.load_digits(seed=seed)
    if dataset == "fashion":
        return data.load_fashion_mnist()
    raise ValueError(f"unknown dataset {dataset!r}: use 'digits' or 'fashion'")


def progress_bar(total: int, desc: str, quiet: bool) -> Any:
    """A batch-level progress bar on stderr (None when quiet)."""
    if quiet:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr,
                dynamic_ncols=True)


def train(model: nn.Module, split: data.Split, epochs: int, lr: float, seed: int,
          batch_size: int = 64, quiet: bool = False, sgd: bool = False,
          step_hook: Any = None, label: str = "train", one_cycle: bool = False
          ) -> list[float]:
    """Train with cross-entropy; returns the mean loss of each epoch. ``one_cycle``: SGD with
    a one-cycle learning-rate schedule (per batch) instead of cosine annealing per epoch."""
    opt: torch.optim.Optimizer = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                                                  nesterov=one_cycle,
                                                  weight_decay=5e-4 if one_cycle else 0.0)
                                  if sgd else torch.optim.Adam(model.parameters(), lr=lr))
    per_epoch = -(-len(split.y_train) // batch_size)
    sched: Any = (torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=per_epoch * epochs)
                  if one_cycle else torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs)))
    bar = progress_bar(per_epoch * epochs, label, quiet)
    losses = []
    for ep in range(epochs):
        model.train()
        if bar is not None:
            bar.set_description(f"{label} epoch {ep + 1}/{epochs}")
        total, n = 0.0, 0
        for x, y in data.batches(split.x_train, split.y_train, batch_size, shuffle=True,
                                 seed=seed + ep):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(centered(x)), y)
            loss.backward()
            opt.step()
            if one_cycle:
                sched.step()
            if step_hook is not None:
                step_hook()
            total, n = total + float(loss.detach()) * len(y), n + len(y)
            if bar is not None:
                bar.update(1)
        if not one_cycle:
            sched.step()
        losses.append(total / max(n, 1))
    if bar is not None:
        bar.close()
    return losses


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The top-1 class of every sample, in eval mode."""
    model.eval()
    return torch.cat([model(centered(x[i:i + batch_size])).argmax(1)
                      for i in range(0, len(x), batch_size)]) if len(x) else \
        torch.zeros(0, dtype=torch.int64)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
             ) -> float:
    return hit_rate(predictions(model, x, batch_size), y)


def hit_rate(pred: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of equal entries (accuracy against labels, or agreement of two models)."""
    return int((pred == y).sum()) / max(len(y), 1)


def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor, batch_size: int = 500) -> float:
    """The fraction of samples on which models ``a`` and ``b`` predict the same class."""
    return hit_rate(predictions(a, x, batch_size), predictions(b, x, batch_size))


def calibration_batches(split: data.Split, n: int = 1024, batch_size: int = 128
                        ) -> list[torch.Tensor]:
    """The first ``n`` training images in batches (a list: it has a length, for the bar)."""
    x = split.x_train[:n]
    return [centered(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]


# Float training per dataset: Adam suits the tiny digits set; Fashion-MNIST trains FashionNet
# with Nesterov SGD, weight decay 5e-4 and a one-cycle schedule (batch 128).
FLOAT_RECIPES = {"digits": ("adam", 3e-3), "fashion-mnist": ("sgd-one-cycle", 0.1)}


def train_float(model: nn.Module, split: data.Split, epochs: int, seed: int,
                quiet: bool = False) -> list[float]:
    opt, lr = FLOAT_RECIPES.get(split.name, ("adam", 3e-3))
    return train(model, split, epochs, lr=lr, seed=seed, quiet=quiet, sgd=opt != "adam",
                 label="float training", one_cycle=opt == "sgd-one-cycle",
                 batch_size=128 if opt == "sgd-one-cycle" else 64)


def default_epochs(dataset: str, epochs: int | None, qat_epochs: int | None
                   ) -> tuple[int, int]:
    """Float and QAT epochs: digits 15 and 3, Fashion-MNIST (60k images) 3 and 1."""
    small = dataset == "digits"
    return (epochs if epochs is not None else (15 if small else 3),
            qat_epochs if qat_epochs is not None else (3 if small else 1))


def run(dataset: str = "digits", march: str = "nash-e", epochs: int | None = None,
        qat_epochs: int | None = None, seed: int = 0, save: str | None = None, quiet: bool = False,
        consistency_level: int = 0) -> dict[str, Any]:
    """The whole workflow; returns the figures printed by ``qatkit demo``. ``consistency_level``
    (nash-e/nash-m): power-of-two scales for calibration, QAT and convert."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    split = load(dataset, seed)
    epochs, qat_epochs = default_epochs(dataset, epochs, qat_epochs)
    example = centered(split.x_train[:2])
    with set_march(march), set_consistency_level(consistency_level):
        float_model = demo_net(split)
        train_float(float_model, split, epochs, seed, quiet)
        float_acc = accuracy(float_model, split.x_test, split.y_test)

        calib = prepare(float_model, example, qconfig=default_calibration_qconfig())
        calibrate(calib, calibration_batches(split), progress=not quiet)  # a bar with a total
        calib_fixed = convert(calib)
        calib_acc = accuracy(calib_fixed, split.x_test, split.y_test)

        qat = prepare(float_model, example, qconfig=default_qat_qconfig())
        qat.load_state_dict(calib.state_dict())
        qat.train()
        set_fake_quantize(qat, FakeQuantState.QAT)
        train(qat, split, qat_epochs, lr=1e-3, seed=seed + 1000, quiet=quiet, sgd=True,
              label="QAT")
        qat.eval()
        set_fake_quantize(qat, FakeQuantState.VALIDATION)
        qat_pred = predictions(qat, split.x_test)
        quantized = convert(qat)
        quant_pred = predictions(quantized, split.x_test)
        qat_acc, quant_acc = hit_rate(qat_pred, split.y_test), hit_rate(quant_pred, split.y_test)
        agree = hit_rate(qat_pred, quant_pred)  # the same forwards, not a second pass
        saved = []
        if save:  # each file atomic, all marked with this run's id (checkpoint.load_run)
            os.makedirs(save, exist_ok=True)
            run_id = uuid.uuid4().hex
            for name, model, what in (("float.pt", float_model, "float model"),
                                      ("calibrated.pt", calib, "calibrated (fake quant)"),
                                      ("qat.pt", qat, "after QAT (fake quant)"),
                                      ("quantized.pt", quantized, "fixed point, from QAT")):
                path = os.path.join(save, name)
                checkpoint.save(model, path, run=run_id)
                saved.append({"path": path, "model": what, "bytes": os.path.getsize(path)})
    return {
        "saved": saved,
        "dataset": split.name, "march": resolve(march).name,
        "float_accuracy": float_acc, "calibration_accuracy": calib_acc,
        "qat_accuracy": qat_acc, "quantized_accuracy": quant_acc,
        "quantized_minus_float": quant_acc - float_acc, "consistency_level": consistency_level,
        "qat_fixed_point_agreement": agree, "epochs": epochs,
        "qat_epochs": qat_epochs, "train_size": len(split.y_train),
        "test_size": len(split.y_test), "seed": seed, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 2),
    }


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    threads = (f"{r['threads']} threads in each of {r['nproc']} processes"
               if r.get("nproc", 1) > 1 else f"{r['threads']} threads")
    t = Table(title=f"qatkit demo: {r['dataset']} on {r['march']}",
              caption=f"{r['seconds']} s, {threads}")
    t.add_column("stage")
    t.add_column("model")
    t.add_column("test accuracy", justify="right")
    t.add_row("float", "float32", f"{r['float_accuracy']:.2%}")
    t.add_row("calibrated", "fixed point", f"{r['calibration_accuracy']:.2%}")
    t.add_row("QAT", "fake quant", f"{r['qat_accuracy']:.2%}")
    t.add_row("QAT -> convert", "fixed point", f"{r['quantized_accuracy']:.2%}")
    if "qat_fixed_point_agreement" in r:
        t.add_row("QAT vs fixed point", "same top-1", f"{r['qat_fixed_point_agreement']:.2%}")
    Console().print(t)
    if r.get("nproc", 1) > 1:
        print(f"calibration and QAT ran on {r['nproc']} processes ({r.get('backend', 'gloo')}); "
              "float training in this process")
    for f in r.get("saved", []):
        print(f"saved {f['path']}: {f['model']}, {f['bytes'] / 1024:.0f} KiB")


def report_models(dataset: str = "digits", march: str = "nash-e", epochs: int | None = None,
                qat_epochs: int = 3, seed: int = 0, damage_layer: str | None = None,
                damage_factor: float = 100.0, quiet: bool = True, width: int = 32
                ) -> dict[str, Any]:
    """The digits (or Fashion-MNIST) workflow of ``qatkit demo``, returning the models:
    float training, calibration, QAT with a FixedPointMonitor per epoch, then (optionally)
    one layer's output scale damaged by ``damage_factor``."""
    from qatkit.analysis.report import damage
    from qatkit.quantization.evaluate import FixedPointMonitor
    torch.manual_seed(seed)
    split = load(dataset, seed)
    epochs = epochs if epochs is not None else (15 if dataset == "digits" else 3)
    example = centered(split.x_train[:2])
    x_test, y_test = centered(split.x_test), split.y_test
    with set_march(march):
        float_model = demo_net(split, width if dataset == "digits" else None)
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
        qat.eval()  # validation (state QAT under eval): the doctor sees a QAT model
        if damage_layer:
            damage(qat, damage_layer, damage_factor)
    return {"float": float_model, "quant": qat, "example_inputs": example, "label": "QAT",
            "data": (x_test, y_test), "monitor": monitor, "march": march,
            "calibration": list(calibration_batches(split)), "dataset": split.name}
