"""Import torchvision 0.28 on the CPU torch wheel (shared/reference/data_and_models.md): its
compiled ops need CUDA, and its meta registrations fail on exactly the two missing op schemas
``nms`` and ``qnms``; define them first (the Library object must stay referenced), then import
again. Model definitions then work with weights=None."""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_LIB: list[torch.library.Library] = []


def torchvision() -> ModuleType:
    """torchvision, importable beside the CPU torch wheel (ImportError where not installed)."""
    try:
        import torchvision as tv
        return tv
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.append(lib)
    import torchvision as tv
    return tv


def import_torchvision() -> ModuleType:
    """:func:`torchvision` in a test: skipped where torchvision is not installed."""
    import pytest
    try:
        return torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed (.ci/run installs torchvision==0.28.0)")
