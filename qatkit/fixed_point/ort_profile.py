"""The ``onnxruntime`` target profile: conv/linear requantization as onnxruntime's fused CPU
kernels compute it, so that the ``qdq`` ONNX export of a model converted with
``qk.convert(model, profile="onnxruntime")`` runs in onnxruntime with exactly its integers.

onnxruntime fuses a ``DequantizeLinear -> Conv/Gemm -> QuantizeLinear`` group into
``QLinearConv``/``QGemm``, which accumulate exactly in int32 and then requantize in float32
(docs/export.md, tested by ``tests/test_export_qdq.py``; ``kernels.ort_constants`` and
``kernels.ort_requant``, used by the conv/linear modules whose ``profile`` is set here)::

    scale[c] = float32(float32(s_in * s_w[c]) / s_o)          each step one float32 operation
    q_o      = clamp(round_half_even(float32(acc + q_b) * scale[c]), lo, hi)

in place of the 16-bit multiplier and round-half-up of ``docs/fixed-point.md`` section 4;
``lo, hi`` are the output range, or the fused ReLU/ReLU6 bounds. Everything else of the
profile moves integers without changing them (QuantStub, DeQuantStub, ReLU, max pooling, shape
ops), so the whole model is that arithmetic. A fixed-point module whose onnxruntime kernel is
not mirrored here (add, pools with a divisor, lookup tables, ...) is refused at convert (QK106),
as are int16 tensors and high-precision outputs (their onnxruntime form is float32 arithmetic
between the Q/DQ nodes, whose rounding depends on the kernel's summation order); a layer whose
int32 accumulator a static bound cannot keep below 2^31, or whose bias is beyond int32 at
``s_in * s_w`` (the int32 bias of QLinearConv/QGemm cannot hold it), is refused at its first
forward, when its input scale is known (``kernels.ort_constants``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from qatkit.base.errors import fail
from qatkit.fixed_point.modules import QConv2d, QDeQuantStub, QLinear, QModule, QQuantStub

PROFILES = ("onnxruntime",)


def apply(model: nn.Module, profile: str) -> None:
    """Give every conv/linear of the converted ``model`` the profile's requantization; refuse
    (QK106) a module the profile does not mirror."""
    check_name(profile)
    for name, mod in model.named_modules():
        if not isinstance(mod, (QModule, QDeQuantStub)):
            continue
        if not isinstance(mod, (QQuantStub, QDeQuantStub, QConv2d, QLinear)):
            raise _refuse(name, mod, "has no onnxruntime kernel the profile mirrors (it "
                          "supports QuantStub, Conv2d, Linear, ReLU/ReLU6 fused into them, "
                          "ReLU, max pooling, shape ops and DeQuantStub)")
        if isinstance(mod, QDeQuantStub):
            continue
        if isinstance(mod, (QConv2d, QLinear)) and mod.output_mode != "quantized":
            raise _refuse(name, mod, "has a high-precision output, which onnxruntime computes "
                          "in float32 (not reproducible)")
        if mod.out_dtype != "qint8":
            raise _refuse(name, mod, f"has {mod.out_dtype} outputs; onnxruntime fuses only "
                          "8-bit groups")
        if isinstance(mod, (QConv2d, QLinear)):
            if mod.weight.dtype != torch.int8:
                raise _refuse(name, mod, "has int16 weights; onnxruntime fuses int8 weights")
            mod.profile = profile
            mod._cache = {}  # constants are made again, with the profile's


def check_name(profile: Any) -> None:
    if profile not in PROFILES:
        raise fail("QK000", f"unknown target profile {profile!r}.",
                   "use profile='onnxruntime', or no profile for qatkit's own arithmetic")


def _refuse(name: str, mod: nn.Module, why: str) -> Exception:
    return fail("QK106", f"target profile 'onnxruntime': {type(mod).__name__} {name!r} {why}.",
                "convert without the profile (its integer ONNX flavour is exact in any "
                "runtime), or change the model")
