"""calibrate: run data through a prepared model in CALIBRATION state, then freeze the scales.

Equivalent to ``model.eval(); set_fake_quantize(model, CALIBRATION); for x in data: model(x);
set_fake_quantize(model, VALIDATION)``, with the checks users forget: data must not be empty,
and every observer must have seen something.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from qatkit.base import hooks
from qatkit.base.errors import QatkitError, fail
from qatkit.base.modules import device_of, unwrap
from qatkit.quantization import validate
from qatkit.quantization.fake_quant import FakeQuantState, fake_quants, set_fake_quantize


def calibrate(model: nn.Module, data: Iterable[Any], progress: bool = False,
              synchronize: bool = False) -> nn.Module:
    """Calibrate ``model`` in place on ``data`` (tensors, tuples of inputs, or (x, y) pairs
    when ``model`` takes one input: the first element is used). Returns the model in
    VALIDATION state (eval mode).

    ``synchronize=True``: every rank of a torch.distributed job calls this on its own shard;
    the statistics are merged and the scales equal one process calibrating on all shards
    (``qatkit.distributed.calibration``, ``docs/distributed.md``). In one process it changes
    nothing."""
    validate.model(model, "qk.calibrate")
    inner = unwrap(model)  # a DDP model: its .module, without DDP's buffer broadcasts
    validate.stage(inner, "qk.calibrate", ("prepared",))
    validate.batches(data, "qk.calibrate")
    # Listeners: distributed code refuses a padding DistributedSampler (samples counted twice)
    # and, with synchronize=True, opens a synchronized calibration of all ranks.
    hooks.emit("calibration_start", model=inner, data=data, synchronize=synchronize)
    try:
        _calibrate(inner, data, progress)
    finally:
        hooks.emit("calibration_stop", model=inner)
    return model


def _calibrate(model: nn.Module, data: Iterable[Any], progress: bool) -> None:
    model.eval()
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    batches = 0
    it = data
    if progress:
        from tqdm.auto import tqdm
        total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        it = tqdm(data, desc="calibration", total=total, unit="batch", leave=False)
    dev = device_of(model)  # batches follow the model, as in qk.evaluate
    with torch.no_grad():
        for batch in it:
            args = validate.batch_inputs(model, batch, "qk.calibrate")
            args = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in args)
            try:
                model(*args)
            except QatkitError:
                raise
            except Exception as e:  # the model's own forward: one clear line, cause chained
                raise validate.forward_error(e, f"calibration batch {batches}") from e
            batches += 1
    # The batch count of all ranks (synchronized calibration): an empty shard is fine, and
    # every rank raises together when there is no data at all.
    batches = max([batches, *hooks.emit("calibration_batches", model=model, batches=batches)])
    if batches == 0:
        raise fail("QK008", "calibration received no data: every scale would be undefined.",
                   "pass a non-empty iterable of input batches (a few hundred samples)")
    set_fake_quantize(model, FakeQuantState.VALIDATION)


def _inputs(model: nn.Module, batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (list, tuple)) and batch:
        # (x, y) pairs from a DataLoader: a one-input model gets x only
        import inspect
        n = len([p for p in inspect.signature(model.forward).parameters.values()
                 if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                        p.POSITIONAL_OR_KEYWORD)])
        return tuple(batch[:n]) if n < len(batch) else tuple(batch)
    raise fail("QK000", f"calibration batch of type {type(batch).__name__} is not a tensor or "
               "a tuple of tensors.", "yield input tensors (or (inputs, target) tuples)")


def uncalibrated(model: nn.Module) -> list[str]:
    """Names of activation fake quants that have no scale yet."""
    return [n for n, fq in fake_quants(model)
            if not fq.is_weight and not fq.fixed and not bool(fq.initialized)]
