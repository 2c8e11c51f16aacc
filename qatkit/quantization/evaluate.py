"""Evaluate the model that will be deployed: the fixed-point one (rule QK006's fix).

``evaluate(model, batches)`` converts a copy of a prepared/QAT model and measures the
fixed-point model; ``FixedPointMonitor`` does it once per epoch inside a QAT loop and also
measures the fake-quant model, keeping the history of their gap. The doctor counts fixed-point
forwards (QK006 stays quiet once the deployed model has been evaluated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from qatkit.base import hooks
from qatkit.base.errors import fail
from qatkit.base.modules import device_of, unwrap
from qatkit.quantization import validate as _validate

Metric = Callable[[torch.Tensor, torch.Tensor], float]

def accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy (a fraction) of logits ``output`` [N, C] against labels ``target`` [N]:
    the integer count of hits divided by their number (no float32 mean, so 721 of 1000 is
    0.721); dense outputs [N, C, H, W] against [N, H, W] count every position."""
    return int((output.argmax(1) == target).sum()) / max(target.numel(), 1)


def _stage(model: nn.Module) -> str:
    from qatkit.quantization import meta
    m = meta.get(model)
    if m is None:
        raise fail("QK000", "evaluate needs a prepared (calibrated or QAT) or converted model; "
                   "this one has no qatkit metadata.",
                   "qk.prepare(...), calibrate/train, then qk.evaluate(model, batches)")
    return m.stage


def _run(model: nn.Module, batches: Iterable[Any], metric: Metric) -> float:
    """Metric averaged over samples (each batch's value weighted by its size)."""
    dev = device_of(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise fail("QK000", "batches must yield (inputs, targets) pairs.",
                           "e.g. a DataLoader over a TensorDataset, or a list of (x, y)")
            x, y = batch
            x = tuple(x) if isinstance(x, (tuple, list)) else (x,)  # several model inputs
            _validate.tensor(x, "qk.evaluate", "the batch inputs")
            if not isinstance(y, torch.Tensor):
                raise fail("QK000", f"qk.evaluate: a batch's targets are a {type(y).__name__}, "
                           "not a tensor.", "yield (inputs, targets) with targets a tensor")
            x = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in x)
            y = y.to(dev)
            out = model(*x)
            n = len(y)
            if metric is accuracy:  # exact: count hits as integers
                total += int((out.argmax(1) == y).sum())
                n = y.numel()
            else:
                total += float(metric(out, y)) * n
            count += n
    if count == 0:
        raise fail("QK000", "evaluate got no batches.", "pass a non-empty iterable of (x, y)")
    return total / count


def fixed_point_model(model: nn.Module) -> nn.Module:
    """The converted model of ``model`` (a converted copy when it is prepared/QAT)."""
    from qatkit.quantization.convert import convert
    model = unwrap(model)
    if _stage(model) == "converted":
        return model
    return convert(model)  # a copy: the QAT model and its state are untouched


def evaluate(model: nn.Module, batches: Iterable[Any], metric: Metric = accuracy) -> float:
    """The fixed-point model's ``metric`` over ``batches`` of ``(inputs, targets)``.

    A prepared/calibrated/QAT ``model`` is converted (a copy) first; a converted model is
    evaluated as is. ``metric(outputs, targets)`` gives a per-batch mean (default: top-1
    accuracy); the result is averaged over samples. The guards of stage "evaluate" run on
    the fixed-point model (e.g. QK008: ops added after convert)."""
    from qatkit.base.march import get_march, resolve
    from qatkit.quantization import validate
    from qatkit.quantization.meta import get as get_meta
    validate.model(model, "qk.evaluate")
    validate.batches(batches, "qk.evaluate")
    q = fixed_point_model(model)
    m = get_meta(q)
    march = get_march() or (resolve(m.march) if m is not None else None)
    recorded = m.march if m is not None else None
    hooks.emit("evaluate", model=q, march=march, recorded_march=recorded)
    return _run(q, batches, metric)


@dataclass
class GapRecord:
    """One monitor step: the two accuracies and ``gap = fake_quant - fixed_point``."""

    step: int
    fake_quant: float
    fixed_point: float

    @property
    def gap(self) -> float:
        return self.fake_quant - self.fixed_point


class FixedPointMonitor:
    """Per-epoch monitoring for QAT loops: fake-quant and fixed-point metric and their gap.

    ``batches`` must be re-iterable (a list or a DataLoader), since every step reads it
    twice. ``step(model)`` evaluates ``model`` in VALIDATION state, converts a copy and
    evaluates the fixed-point model, then restores the model's mode and fake-quant states, so
    it can sit between two training epochs::

        monitor = qk.FixedPointMonitor(val_batches)
        for epoch in range(epochs):
            train_one_epoch(qat)
            rec = monitor.step(qat)
            print(epoch, rec.fake_quant, rec.fixed_point, rec.gap)
    """

    def __init__(self, batches: Iterable[Any], metric: Metric = accuracy) -> None:
        if iter(batches) is batches:
            raise fail("QK000", "FixedPointMonitor needs re-iterable batches (a list or a "
                       "DataLoader), not a one-shot iterator or generator.",
                       "pass list(batches) or the DataLoader itself")
        self.batches, self.metric = batches, metric
        self.history: list[GapRecord] = []

    def step(self, model: nn.Module) -> GapRecord:
        from qatkit.quantization.fake_quant import FakeQuantState, fake_quants, set_fake_quantize
        inner = unwrap(model)
        if _stage(inner) == "converted":
            raise fail("QK000", "FixedPointMonitor.step needs the prepared/QAT model (it "
                       "converts a copy itself).", "pass the model you train")
        fixed = _run(fixed_point_model(inner), self.batches, self.metric)
        was_training = inner.training
        states = {id(fq): fq.state for _, fq in fake_quants(inner)}
        try:
            inner.eval()
            set_fake_quantize(inner, FakeQuantState.VALIDATION)
            fq_value = _run(inner, self.batches, self.metric)
        finally:
            inner.train(was_training)
            for _, fq in fake_quants(inner):
                fq.state = states[id(fq)]
        rec = GapRecord(len(self.history), fq_value, fixed)
        self.history.append(rec)
        return rec

    @property
    def gaps(self) -> list[float]:
        return [r.gap for r in self.history]

    def worst(self) -> GapRecord | None:
        """The step with the largest gap (fixed point furthest below fake quant)."""
        return max(self.history, key=lambda r: r.gap, default=None)


__all__ = ["FixedPointMonitor", "GapRecord", "accuracy", "evaluate", "fixed_point_model"]
