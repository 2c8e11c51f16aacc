"""Accept models written for torch.ao eager-mode quantization.

Their ``QuantStub``/``DeQuantStub``/``FloatFunctional`` and their float fused modules
(``torch.ao.nn.intrinsic.ConvBn2d``, ``ConvBnReLU2d``, ``ConvReLU2d``, ``LinearReLU``...) are
swapped for qatkit's equivalents. qatkit does not use torch.ao otherwise.
"""

from __future__ import annotations

import torch.nn as nn

from qatkit.base.errors import fail
from qatkit.base.modules import set_submodule
from qatkit.quantization.fused import as_fused_conv, as_fused_linear, fold_bn
from qatkit.quantization.stubs import DeQuantStub, FloatFunctional, QuantStub


def _ao_kind(m: nn.Module) -> str | None:
    mod = type(m).__module__
    if not mod.startswith("torch.ao.") and not mod.startswith("torch.nn.quantized"):
        return None
    name = type(m).__name__
    if ".qat" in mod or (".quantized" in mod and name != "FloatFunctional"):
        raise fail("QK000", f"module of type {mod}.{name} is already prepared or converted by "
                   "torch.ao.", "pass qatkit the float model (before torch.ao's prepare)")
    return name


def _swap(m: nn.Module) -> nn.Module | None:
    kind = _ao_kind(m)
    if kind is None:
        return None
    if kind == "QuantStub":
        return QuantStub()
    if kind == "DeQuantStub":
        return DeQuantStub()
    if kind == "FloatFunctional":
        return FloatFunctional()
    children = list(m.children())
    if kind in ("ConvBn2d", "ConvBnReLU2d"):
        fused = fold_bn(children[0], children[1])
        fused.activation = "relu" if kind == "ConvBnReLU2d" else None
        return fused
    if kind == "ConvReLU2d":
        fused = as_fused_conv(children[0])
        fused.activation = "relu"
        return fused
    if kind == "LinearReLU":
        lin = as_fused_linear(children[0])
        lin.activation = "relu"
        return lin
    if kind == "QuantWrapper" or not children:
        return None
    raise fail("QK106", f"torch.ao module type {kind} is not supported by qatkit.",
               "use plain torch.nn modules with qatkit's (or torch.ao's) stubs")


def from_torch_ao(model: nn.Module) -> nn.Module:
    """Swap torch.ao eager-mode modules in place; returns the model (the root may change)."""
    root = _swap(model)
    if root is not None:
        return root
    for name, child in list(model.named_children()):
        new = _swap(child)
        if new is not None:
            set_submodule(model, name, new)  # qconfig and silencing travel with it
        else:
            from_torch_ao(child)
    return model
