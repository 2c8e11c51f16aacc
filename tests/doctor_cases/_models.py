"""Small real models and data shared by the cases (sklearn digits, real photos)."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

import qatkit as qk
from tests._rules import DigitsNet, calibrate, digits, trained_digits_net

__all__ = [
    "DigitsNet",
    "Heads",
    "calibrate",
    "calibrated",
    "digits",
    "photos",
    "trained_digits_net",
    "x8",
]


def x8() -> torch.Tensor:
    return digits().x_train[:8]


def calibrated(model: nn.Module | None = None, n: int = 256) -> nn.Module:
    d = digits()
    return calibrate(qk.prepare(model or trained_digits_net(), d.x_train[:8],
                                qconfig=qk.default_calibration_qconfig()), d.x_train[:n])


class Heads(nn.Module):
    """A detection-style model: a backbone and two 1x1 conv heads (class scores, boxes)."""

    def __init__(self, joined: bool = False) -> None:
        super().__init__()
        self.joined = joined
        self.quant = qk.QuantStub()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.cls, self.box = nn.Conv2d(8, 3, 1), nn.Conv2d(8, 4, 1)
        if joined:
            self.cat, self.dq = qk.FloatFunctional(), qk.DeQuantStub()
        else:
            self.dq_cls, self.dq_box = qk.DeQuantStub(), qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(self.quant(x))
        if self.joined:
            return self.dq(self.cat.cat([self.cls(f), self.box(f)], 1))
        return torch.cat([self.dq_cls(self.cls(f)), self.dq_box(self.box(f))], 1)


@functools.cache
def photos() -> torch.Tensor:
    """Four real photos (scikit-image), 96x96 crops, uint8 N,3,H,W."""
    import numpy as np
    from skimage import data as skdata
    ims = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    return torch.stack([torch.tensor(np.transpose(im[:96, :96], (2, 0, 1))) for im in ims])
