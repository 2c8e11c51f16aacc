"""Shared models for the comparison/stats/sensitivity/causes/report tests: the digits demo
network, trained once per test session (a few seconds on one thread), then calibrated and
optionally damaged (one output scale multiplied by a factor before convert)."""

from __future__ import annotations

import copy
import functools
import warnings

import torch

import qatkit as qk
from qatkit.analysis.report import damage
from qatkit.demo.recipe import DemoNet, calibration_batches, centered, train
from qatkit.quantization.calibrate import calibrate

MARCH = "nash-e"
# Module-scoped fixtures run before conftest's per-test one-thread fixture: two threads on a
# shared 2-core machine spin and can take ten times longer.
torch.set_num_threads(1)


@functools.cache
def digits():
    from qatkit.demo.data import load_digits
    return load_digits(seed=0)


@functools.cache
def _trained(width: int, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = DemoNet(10, width=width)
    train(m, digits(), epochs=epochs, lr=3e-3, seed=0, quiet=True)
    return m.eval()


def trained(width: int = 16, epochs: int = 4) -> torch.nn.Module:
    """A fresh copy of the trained float model (tests may modify it)."""
    return copy.deepcopy(_trained(width, epochs))


def example() -> torch.Tensor:
    return centered(digits().x_train[:2])


def labelled(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    d = digits()
    x, y = centered(d.x_test), d.y_test
    return (x, y) if n is None else (x[:n], y[:n])


@functools.cache
def _calibrated(width: int, epochs: int) -> torch.nn.Module:
    with qk.set_march(MARCH):
        c = qk.prepare(_trained(width, epochs), example(),
                       qconfig=qk.default_calibration_qconfig())
        return calibrate(c, calibration_batches(digits(), n=512))


def stages(layer: str | None = None, factor: float = 20.0, width: int = 16, epochs: int = 4
           ) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(float, calibrated, fixed point), with ``layer``'s output scale times ``factor``."""
    calib = copy.deepcopy(_calibrated(width, epochs))
    if layer is not None:
        damage(calib, layer, factor)
    with qk.set_march(MARCH), warnings.catch_warnings():
        warnings.simplefilter("ignore", qk.QatkitWarning)  # QK105 on the damaged scale
        fixed = qk.convert(calib)
    return trained(width, epochs), calib, fixed
