"""The torch.ao eager-mode quantization flow (x86 backend), as a peer to compare qatkit against.

QAT:  fuse_modules_qat -> qconfig = get_default_qat_qconfig("x86") -> prepare_qat -> train ->
      convert.
PTQ:  fuse_modules -> qconfig = get_default_qconfig("x86") -> prepare -> calibrate -> convert.

Every function works on a deep copy and leaves the float model untouched.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .models import fuse_spec

with warnings.catch_warnings():
    # torch.ao.quantization announces its migration to the torchao package; the eager API used
    # here is the one the comparison is about.
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.quantization import (
        convert,
        fuse_modules,
        fuse_modules_qat,
        get_default_qat_qconfig,
        get_default_qconfig,
        prepare,
        prepare_qat,
    )

__all__ = [
    "BACKEND",
    "float_forward",
    "int8_forward",
    "torchao_convert",
    "torchao_int8_model",
    "torchao_qat_model",
    "train_step",
    "use_backend",
]

BACKEND = "x86"

# Deprecation notices torch 2.x prints while preparing/converting (not about this usage).
_NOISE = (
    r"Please use quant_min and quant_max",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def use_backend(backend: str = BACKEND) -> None:
    """Select the quantized engine that converted models run on (process-wide setting)."""
    if backend not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"quantized engine {backend!r} not available; have "
            f"{torch.backends.quantized.supported_engines}"
        )
    torch.backends.quantized.engine = backend


def torchao_qat_model(float_model: nn.Module, backend: str = BACKEND) -> nn.Module:
    """Fused, fake-quantized copy of ``float_model`` in train mode, ready for QAT steps."""
    use_backend(backend)
    model = copy.deepcopy(float_model).train()
    with _quiet():
        fuse_modules_qat(model, fuse_spec(model), inplace=True)
        model.qconfig = get_default_qat_qconfig(backend)
        prepare_qat(model, inplace=True)
    return model


def torchao_convert(qat_model: nn.Module, backend: str = BACKEND) -> nn.Module:
    """int8 model from a QAT (or calibrated) prepared model; the input model is not modified."""
    use_backend(backend)
    model = copy.deepcopy(qat_model).eval()
    with _quiet():
        convert(model, inplace=True)
    return model


def torchao_int8_model(
    float_model: nn.Module,
    calib_batches: Iterable[torch.Tensor | tuple[torch.Tensor, ...]],
    backend: str = BACKEND,
) -> nn.Module:
    """Post-training static quantization: fuse, prepare, calibrate on ``calib_batches`` (tensors
    or ``(x, y)`` tuples, only ``x`` is used), convert to int8."""
    use_backend(backend)
    model = copy.deepcopy(float_model).eval()
    with _quiet():
        fuse_modules(model, fuse_spec(model), inplace=True)
        model.qconfig = get_default_qconfig(backend)
        prepare(model, inplace=True)
        with torch.no_grad():
            for batch in calib_batches:
                model(batch[0] if isinstance(batch, tuple | list) else batch)
        convert(model, inplace=True)
    return model


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """One cross-entropy training step (forward, backward, optimizer step); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def float_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inference forward (no autograd) of a float model."""
    with torch.inference_mode():
        return model(x)


def int8_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inference forward of a converted int8 model: float in, quantize, int8 ops, float out."""
    with torch.inference_mode():
        return model(x)
