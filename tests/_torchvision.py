"""Import torchvision's model definitions on a CPU-only torch (shared/reference/
data_and_models.md): the CUDA wheel's compiled ops are missing, and its meta registrations
fail only on ``nms``/``qnms``; defining those two schemas first lets the import succeed.
Model definitions then work with ``weights=None``."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

_keep: list[Any] = []  # the Library object must stay referenced


def torchvision() -> ModuleType:
    try:
        import torchvision as tv
        return tv
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _keep.append(lib)
    import torchvision as tv
    return tv
