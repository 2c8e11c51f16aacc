"""torchao's PT2E quantization flow (x86 Inductor backend), the second peer qatkit is compared with.

PTQ:  torch.export -> prepare_pt2e(X86InductorQuantizer) -> calibrate -> convert_pt2e ->
      torch.compile (Inductor, ``freezing=True`` as torchao's x86 recipe asks, so that the int8
      weights are prepacked and q/dq pairs lower to oneDNN int8 kernels).
QAT:  torch.export (train) -> prepare_qat_pt2e(X86InductorQuantizer(is_qat=True)) -> train the
      exported GraphModule eagerly (what torchao's QAT tutorial does).

This is what PyTorch recommends for CNN QAT now that ``torch.ao.quantization`` is deprecated.
Needs the optional ``bench`` extra (``pip install -e .[bench]``, torchao 0.18); without it
:func:`available` is False and the bench leaves the pt2e figures out. Every function works on a
deep copy and leaves the float model untouched.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["available", "pt2e_int8_model", "pt2e_qat_model"]


def available() -> bool:
    """torchao's pt2e flow is importable (the optional ``bench`` extra is installed)."""
    return importlib.util.find_spec("torchao") is not None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # export/prepare warn about APIs unrelated to this comparison
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@functools.cache
def _api() -> dict[str, Any]:
    # torchao's import prints a line per optional CUDA extension it cannot load on a CPU-only
    # machine (C++ code, straight to file descriptor 2): silenced for the import only
    logging.getLogger("torchao").setLevel(logging.ERROR)
    devnull, saved = os.open(os.devnull, os.O_WRONLY), os.dup(2)
    os.dup2(devnull, 2)
    try:
        with _quiet():
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
            from torchao.quantization.pt2e.quantize_pt2e import (
                convert_pt2e,
                prepare_pt2e,
                prepare_qat_pt2e,
            )
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return {"xiq": xiq, "prepare": prepare_pt2e, "prepare_qat": prepare_qat_pt2e,
            "convert": convert_pt2e}


def _quantizer(is_qat: bool) -> Any:
    xiq = _api()["xiq"]
    q = xiq.X86InductorQuantizer()
    q.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat))
    return q


def _export(model: nn.Module, example: torch.Tensor, dynamic_batch: bool) -> nn.Module:
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with _quiet():
        return torch.export.export(model, (example,), dynamic_shapes=shapes).module()


def pt2e_int8_model(
    float_model: nn.Module,
    calib_batches: Iterable[torch.Tensor],
    example: torch.Tensor,
    compile: bool = True,
    dynamic_batch: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """PTQ int8 model: export the eval model on ``example``, prepare with the x86 Inductor
    quantizer, calibrate on ``calib_batches``, convert; compiled by Inductor (freezing on) unless
    ``compile`` is False (then the q/dq reference graph runs eagerly, for smoke runs). The
    returned callable runs without autograd. ``dynamic_batch``: export with a symbolic batch
    size (inputs of any batch size; the accuracy section evaluates in chunks); Inductor still
    compiles each batch size it sees with static shapes (see the comment at the compile)."""
    api = _api()
    model = copy.deepcopy(float_model).eval()
    gm = _export(model, example, dynamic_batch)
    with _quiet():
        prepared = api["prepare"](gm, _quantizer(is_qat=False))
        with torch.no_grad():
            for xb in calib_batches:
                prepared(xb)
        converted = api["convert"](prepared)
    if not compile:
        def run_eager(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return converted(x)
        return run_eager
    # Static shapes in Inductor even for a dynamic-batch export (one compile per batch size):
    # with symbolic shapes, torch 2.13's conv lowering expects a contiguous output for a
    # contiguous 1-channel input (right for the unpacked float conv), but the quantized conv
    # it lowers to runs on prepacked weights and always writes channels last, so the first
    # conv of a 1x28x28 model fails its stride assertion. Static shapes expect channels last.
    compiled = torch.compile(converted, dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        # freezing is read when Inductor compiles (first call, and any recompile)
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return compiled(x)

    return run


def pt2e_qat_model(float_model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Exported, QAT-prepared copy of ``float_model`` (fake quant + observers in the graph,
    conv-bn kept as torchao's QAT pattern), ready for eager training steps."""
    api = _api()
    model = copy.deepcopy(float_model).train()
    gm = _export(model, example, dynamic_batch=False)
    with _quiet():
        return api["prepare_qat"](gm, _quantizer(is_qat=True))
