"""Checks of what users pass to the public entry points, each failing with one clear QK000
error that says what was wrong and what to do (instead of a traceback from deep in torch).

Decisions where a choice had to be made:

* models: float32 only. A half/bfloat16 model is refused at prepare (fake quant, scales and
  the bias rule of ``docs/fixed-point.md`` are float32 arithmetic): ``model.float()`` first.
  A model on the meta device (no values) is refused.
* inputs: floating-point tensors. uint8 images and int64 tensors are refused: a QuantStub
  quantizes real values, so ``x.float() / 255`` (and the training normalisation) comes first.
* batches (calibrate, evaluate): an iterable of batches; a single tensor is refused (iterating
  it would feed single samples without their batch dimension). A batch is a tensor, a tuple of
  model inputs, or ``(inputs, target)``; ``((x1, x2), y)`` feeds ``x1, x2`` to a two-input
  model.
* the model's outputs: every output of the quantized region must leave it through a
  DeQuantStub. Otherwise the fixed-point model would return a QTensor and the user's
  ``out.argmax(1)`` would fail far away, so prepare refuses the model (QK000).
* stages: calibrating, training or re-preparing a converted model is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from qatkit.base.errors import fail


def model(m: Any, who: str) -> nn.Module:
    """``m`` is an ``nn.Module`` with float32 values on a real device."""
    if m is None or not isinstance(m, nn.Module):
        raise fail("QK000", f"{who} needs a torch.nn.Module, got "
                   f"{'None' if m is None else type(m).__name__}.",
                   "pass the model object (not its state_dict, output or class)")
    for kind, tensors in (("parameter", m.named_parameters()), ("buffer", m.named_buffers())):
        for name, t in tensors:
            if t.is_meta:
                raise fail("QK000", f"{who}: the model's {kind} {name!r} is on the meta device "
                           "(it has no values), so nothing can be calibrated or converted.",
                           "materialise the model first (model.to_empty(device='cpu') and "
                           "load its weights)")
            if kind == "parameter" and t.is_floating_point() and t.dtype != torch.float32:
                raise fail("QK000", f"{who}: the model's {kind} {name!r} is {_dtype(t)}; "
                           "qatkit quantizes float32 models (fake quant and the fixed-point "
                           "rules are float32 arithmetic).",
                           "call model.float() before qk.prepare (train in mixed precision "
                           "with autocast if you need it)")
    return m


def stage(m: nn.Module, who: str, allowed: tuple[str, ...]) -> None:
    """Refuse a model whose qatkit stage (None: float) is not in ``allowed``."""
    from qatkit.quantization import meta
    info = meta.get(m)
    have = info.stage if info is not None else "float"
    if have in allowed:
        return
    if have == "converted":
        raise fail("QK000", f"{who} got a converted (fixed-point) model; it computes on integers "
                   "with frozen scales, so it cannot be " + (
                       "calibrated" if "calibrat" in who else "prepared again" if "prepare" in who
                       else "changed") + ".",
                   "use the prepared (calibrated/QAT) model it was converted from, then "
                   "qk.convert again")
    raise fail("QK000", f"{who} needs a {' or '.join(allowed)} model, got a {have} model.",
               "call qk.prepare(model, example_inputs, qconfig=...) first")


def inputs(x: Any, who: str) -> tuple[Any, ...]:
    """Example inputs: a tensor or a tuple/list of the model's positional inputs."""
    if x is None:
        raise fail("QK000", f"{who}: example_inputs is None.",
                   "pass one input batch, e.g. x[:2], or a tuple (x1, x2) for several inputs")
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not args:
        raise fail("QK000", f"{who}: example_inputs is empty.",
                   "pass one input batch, e.g. x[:2], or a tuple (x1, x2)")
    for i, a in enumerate(args):
        tensor(a, who, f"input {i}", dtypes=False)
        if isinstance(a, torch.Tensor) and a.numel() == 0:  # (an empty calibration shard is fine)
            raise fail("QK000", f"{who}: input {i} is empty (shape {tuple(a.shape)}).",
                       "pass at least one sample")
    return args


def tensor(t: Any, who: str, what: str, dtypes: bool = False) -> None:
    """Tensors entering the model: torch tensors with values; with ``dtypes``, float32. Other
    leaves (None, numbers, strings) pass, since the model's own signature decides about them.
    Integer inputs that do not enter a QuantStub (indices, masks) are the model's business:
    a QuantStub itself refuses a non-float tensor."""
    if isinstance(t, (tuple, list)):
        for i, u in enumerate(t):
            tensor(u, who, f"{what}[{i}]", dtypes)
        return
    if hasattr(t, "__array__") and not isinstance(t, torch.Tensor):
        raise fail("QK000", f"{who}: {what} is a {type(t).__name__}, not a torch.Tensor.",
                   "convert it with torch.from_numpy(a).float()")
    if not isinstance(t, torch.Tensor):
        return
    if t.is_meta:
        raise fail("QK000", f"{who}: {what} is on the meta device (no values).",
                   "pass real data")
    if not dtypes:
        return
    if not t.is_floating_point():
        hint = ("x.float() / 255 (then your training normalisation)" if t.dtype == torch.uint8
                else "x.float()")
        raise fail("QK000", f"{who}: {what} is a {_dtype(t)} tensor; a QuantStub quantizes "
                   "real values, so the model's inputs must be float32.", f"pass {hint}")
    if t.dtype != torch.float32:
        raise fail("QK000", f"{who}: {what} is {_dtype(t)}; qatkit models take float32 inputs.",
                   "pass x.float()")


def batches(data: Any, who: str) -> Iterable[Any]:
    """An iterable of batches (not None, not a single tensor, not a string)."""
    if data is None:
        raise fail("QK000", f"{who}: the data is None.",
                   "pass an iterable of batches: a DataLoader, or a list of tensors")
    if isinstance(data, torch.Tensor):
        raise fail("QK000", f"{who} got a single tensor of shape {tuple(data.shape)}; it iterates "
                   "over batches, so it would feed single samples without their batch "
                   "dimension.", "pass a list of batches, e.g. [x] or list(x.split(64))")
    if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise fail("QK000", f"{who}: the data must be an iterable of batches, got "
                   f"{type(data).__name__}.", "pass a DataLoader or a list of tensors")
    return data


def batch_inputs(m: nn.Module, batch: Any, who: str) -> tuple:
    """The model inputs of one batch: a tensor; a tuple of inputs; ``(inputs, target)``; or
    ``((x1, x2), y)`` (the nested inputs)."""
    if isinstance(batch, torch.Tensor) or hasattr(batch, "__array__"):
        tensor(batch, who, "a batch")
        return (batch,)
    if isinstance(batch, dict) or not isinstance(batch, (tuple, list)) or not batch:
        raise fail("QK000", f"{who}: a batch of type {type(batch).__name__} is not a tensor or "
                   "a tuple of tensors.", "yield input tensors (or (inputs, target) tuples)")
    if isinstance(batch[0], (tuple, list)):  # ((x1, x2), y): the inputs are nested
        args = tuple(batch[0])
    else:
        n = positional_count(m)
        args = tuple(batch[:n]) if n < len(batch) else tuple(batch)
    for i, a in enumerate(args):
        tensor(a, who, f"batch input {i}")
    return args


def positional_count(m: nn.Module) -> int:
    import inspect
    try:
        params = inspect.signature(m.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 1 << 30
    return len([p for p in params if p.default is p.empty and p.kind in (
        p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


def outputs_dequantized(g: Any) -> None:
    """Every model output computed in the quantized region passed a DeQuantStub."""
    from qatkit.quantization import trace as tr
    region = tr.quantized_nodes(g)
    bad = [n for n in g.nodes if n.is_output and n.index in region]
    if bad:
        n = bad[0]
        where = f" ({n.source})" if n.source else ""
        raise fail("QK000", f"the model returns the output of {n.label!r}{where} without a "
                   "DeQuantStub: the fixed-point model would return integers (a QTensor) where "
                   "a float tensor is expected.",
                   "end the quantized region with a DeQuantStub: self.dequant = "
                   "qk.DeQuantStub() in __init__, return self.dequant(x) in forward")


def forward_error(e: BaseException, where: str) -> Exception:
    """The model's own forward raised (a shape or type mismatch, usually): one QK000 line with
    the original error's first line (the original stays chained as ``__cause__``)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return fail("QK000", f"the model's forward failed on {where}: {type(e).__name__}: "
                f"{first[:300]}", "check the inputs' shapes and number against the model's "
                "forward (example_inputs is one batch: a tensor or a tuple of the inputs)")


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")
