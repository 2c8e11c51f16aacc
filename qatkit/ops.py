"""The operator table: which float modules qatkit quantizes, and how.

* ``PASSTHROUGH``: ops that move integers without changing them; they keep their input scale
  and stay as they are in every stage (the fixed-point model runs them on QTensors).
* ``OWN_OUTPUT``: ops that change values; each gets its own output fake quant (``QATOp``) and
  a fixed-point form with its own output scale.
* ``WEIGHTED``: conv/linear/transposed conv with per-channel weight fake quant.
* Functions allowed on quantized values in ``forward`` (everything else must be a module or a
  FloatFunctional method, rule QK102).
"""

from __future__ import annotations

import torch.nn as nn

from qatkit.fused import FusedConv2d, FusedLinear
from qatkit.stubs import DeQuantStub, FloatFunctional, QuantStub

PASSTHROUGH: dict[type, str] = {
    nn.ReLU: "relu", nn.MaxPool2d: "max_pool2d", nn.Flatten: "flatten",
    nn.Identity: "identity", nn.Dropout: "dropout", DeQuantStub: "dequant",
}
OWN_OUTPUT: dict[type, str] = {
    nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.AvgPool2d: "avg_pool2d",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
    nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
}
WEIGHTED: dict[type, str] = {
    nn.Conv2d: "conv2d", FusedConv2d: "conv2d", nn.Linear: "linear", FusedLinear: "linear",
    nn.ConvTranspose2d: "conv_transpose2d",
}
GEMM_KINDS = frozenset({"conv2d", "linear", "conv_transpose2d", "matmul"})
FUNCTIONS_ON_QUANTIZED = frozenset({
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
    "__getitem__", "relu", "relu_", "max_pool2d", "_max_pool2d", "dropout", "interpolate",
    "size", "dim",
})


def op_kind(module: nn.Module | None, functional_op: str | None = None) -> str | None:
    """The op kind (see ``march.ALL_OPS``) of a module or FloatFunctional call, or None."""
    if functional_op is not None:
        return {"add_relu": "add", "concat": "cat"}.get(functional_op, functional_op)
    if module is None:
        return None
    from qatkit.qat import QATConv2d, QATConvTranspose2d, QATLinear, QATOp
    if isinstance(module, QATOp):
        return op_kind(module.op)
    t = type(module)
    if t in (QATConv2d,):
        return "conv2d"
    if t in (QATLinear,):
        return "linear"
    if t in (QATConvTranspose2d,):
        return "conv_transpose2d"
    if t is QuantStub:
        return "quant"
    if t is FloatFunctional:
        return None
    if t is nn.Upsample:
        return "upsample_nearest" if module.mode == "nearest" else (
            "upsample_bilinear" if module.mode == "bilinear" else None)
    if t is nn.BatchNorm2d:
        return "batchnorm2d"
    return PASSTHROUGH.get(t) or OWN_OUTPUT.get(t) or WEIGHTED.get(t)


def has_own_output(module: nn.Module) -> bool:
    t = type(module)
    return t in OWN_OUTPUT or (t is nn.Upsample and module.mode == "bilinear")
