"""Import torchvision 0.28 on the CPU torch wheel (shared/reference/data_and_models.md): its
compiled ops need CUDA, and its meta registrations fail on exactly the two missing op schemas
``nms`` and ``qnms``; define them first (the Library object must stay referenced), then import
again. Model definitions then work with weights=None."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
import torch

_LIB: list[torch.library.Library] = []


def import_torchvision() -> ModuleType:
    """torchvision, importable (the test is skipped where it is not installed)."""
    try:
        import torchvision
    except ImportError:
        pytest.skip("torchvision is not installed (.ci/run installs torchvision==0.28.0)")
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.append(lib)
        import torchvision
    return torchvision
