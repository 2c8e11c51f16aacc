"""Shared pieces of the QK001..QK009 tests (no tests here): real data, a short float training,
calibration, and helpers to assert which rule codes fired."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

import qatkit as qk
from qatkit.base.errors import QatkitWarning

torch.set_num_threads(1)


@functools.cache
def digits() -> Any:
    """sklearn digits as float tensors (N, 1, 8, 8) in [0, 1], stratified split."""
    try:
        from qatkit.demo.data import load_digits
    except ImportError:  # qatkit.demo.data not there yet
        load_digits = None
    if load_digits is not None:
        return load_digits()
    from types import SimpleNamespace

    from sklearn.datasets import load_digits as sk
    from sklearn.model_selection import train_test_split
    d = sk()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16
    y = torch.tensor(d.target)
    i_tr, i_te = train_test_split(range(len(y)), test_size=0.25, random_state=0, stratify=d.target)
    return SimpleNamespace(x_train=x[i_tr], y_train=y[i_tr], x_test=x[i_te], y_test=y[i_te])


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 3,
          lr: float = 1e-2, batch: int = 64, step: Callable[..., torch.Tensor] | None = None,
          seed: int = 0) -> nn.Module:
    """A few epochs of Adam on cross-entropy (``step(model, x, y)`` returns the loss)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            opt.zero_grad()
            xb, yb = x[i:i + batch], y[i:i + batch]
            loss = step(model, xb, yb) if step else nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
    return model.eval()


def calibrate(model: nn.Module, x: torch.Tensor, batch: int = 256,
              call: Callable[[nn.Module, torch.Tensor], Any] | None = None) -> nn.Module:
    model.eval()
    qk.set_fake_quantize(model, qk.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            (call or (lambda m, xb: m(xb)))(model, x[i:i + batch])
    qk.set_fake_quantize(model, qk.FakeQuantState.VALIDATION)
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@contextmanager
def qk_warnings() -> Iterator[list[str]]:
    """Collect the codes of the QatkitWarnings raised inside the block."""
    codes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield codes
    codes.extend(w.message.code for w in caught if isinstance(w.message, QatkitWarning))


class DigitsNet(nn.Module):
    """A small real CNN for 8x8 digits: conv-bn-relu x2 with a residual add, 2x2 average
    pooling, linear (about 95 % test accuracy after 3 epochs)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), \
            nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.add, self.relu2 = qk.FloatFunctional(), nn.ReLU()
        self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(16 * 4 * 4, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.relu2(self.add.add(self.bn2(self.conv2(x)), x))
        return self.pool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.features(x)))


@functools.cache
def trained_digits_net() -> DigitsNet:
    d = digits()
    torch.manual_seed(0)
    return train(DigitsNet(), d.x_train, d.y_train, epochs=3)
