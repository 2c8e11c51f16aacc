"""The operator registry: one row per operator kind, every fact about it in one place.

A row says which float modules (or FloatFunctional methods) are this kind, how ``prepare``
makes its QAT form, how ``convert`` makes its fixed-point form from that, whether it keeps its
input scale (it moves integers without changing them), whether it is a lookup table, whether it
is a GEMM (high-precision output candidates), and which marches lack it. ``prepare``,
``convert``, the trace, the doctor's rules and the comparison all read this table; adding an
operator is one row here plus its kernel (``qatkit.fixed_point.kernels``), its fixed-point
module (``qatkit.fixed_point.modules``), the spec (docs/fixed-point.md) and its tests.

Module types are matched along the class hierarchy: a subclass of a listed module (e.g. a
model library's own ``nn.Linear`` subclass) is that kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from qatkit.base.errors import fail
from qatkit.base.march import MARCHES, March
from qatkit.fixed_point import float16 as f16
from qatkit.fixed_point import modules as fx
from qatkit.quantization.fake_quant import FakeQuantize
from qatkit.quantization.fused import FusedConv2d, FusedLinear
from qatkit.quantization.qat import QATConv2d, QATConvTranspose2d, QATLinear, QATOp, _QATWeighted
from qatkit.quantization.stubs import DeQuantStub, FloatFunctional, QuantStub

_OLD_BPU = frozenset({"bernoulli", "bernoulli2"})  # no lookup tables on these cores


@dataclass(frozen=True)
class Op:
    """One operator kind. ``qat``: ``"weighted"`` (per-channel weight + output fake quant, a
    ``qatkit.quantization.qat`` class), ``"output"`` (an output fake quant, ``QATOp``), or
    ``None`` (stays as it is: keeps its input scale, or is handled by the stubs/fusion);
    ``fixed_point``: the QAT module -> its fixed-point module."""

    kind: str
    modules: tuple[type, ...] = ()
    functional: tuple[str, ...] = ()  # FloatFunctional / QFunctional methods of this kind
    qat: str | None = None
    qat_class: type | None = None  # the QAT module for qat == "weighted"
    fixed_point: Callable[[nn.Module], nn.Module] | None = None
    keeps_scale: bool = False
    lut: bool = False
    gemm: bool = False
    missing_on: frozenset[str] = frozenset()
    # classes of optional libraries, by "module.QualName" (matched along the class hierarchy
    # before the types above, so e.g. an nn.LayerNorm subclass can be its own kind)
    names: tuple[str, ...] = ()
    # torch functions / tensor methods that are this op when called in ``forward``: prepare
    # gives each call site its own operator module (``qatkit.quantization.call_sites``).
    # ``call`` says how the call's arguments are read: "binary" (x op y, or x op scalar),
    # "list" (cat/stack), "reduce" (mean/sum over dims) or "module" (``from_call`` builds the
    # float module from the call's arguments; None: this call keeps its input scale, no op)
    functions: tuple[str, ...] = ()
    call: str | None = None
    from_call: Callable[[tuple, dict], nn.Module | None] | None = None


def _quant(m: nn.Module) -> nn.Module:
    fq = m.activation_post_process
    return fx.QQuantStub(fq.scale, fq.dtype)


def _lut(m: QATOp) -> nn.Module:
    fq = m.activation_post_process
    return fx.QLookupTable(kind_of(m.op) or "", fq.scale, fq.dtype)


def _clamp(m: QATOp) -> nn.Module:
    fq = m.activation_post_process
    return fx.QClamp(m.op.min_val, m.op.max_val, fq.scale, fq.dtype)


def _avg_pool(m: QATOp) -> nn.Module:
    op, fq = m.op, m.activation_post_process
    if op.ceil_mode or not op.count_include_pad or op.divisor_override:  # section 17
        return fx.QAvgPool2dDivisor(op.kernel_size, op.stride, op.padding, op.ceil_mode,
                                    op.count_include_pad, op.divisor_override, fq.scale,
                                    fq.dtype)
    return fx.QAvgPool2d(op.kernel_size, op.stride, op.padding, fq.scale, fq.dtype)


def _adaptive_avg_pool(m: QATOp) -> nn.Module:
    fq = m.activation_post_process
    return fx.QAvgPool2d(None, None, 0, fq.scale, fq.dtype, adaptive_out=m.op.output_size)


def _bilinear(m: QATOp) -> nn.Module:
    op, fq = m.op, m.activation_post_process
    return fx.QUpsampleBilinear(op.size, op.scale_factor, bool(op.align_corners), fq.scale,
                                fq.dtype, op.recompute_scale_factor)


def _prelu(m: QATOp) -> nn.Module:
    op, fq = m.op, m.activation_post_process
    slope = op.weight if isinstance(op, nn.PReLU) else op.negative_slope
    return fx.QPReLU(slope, fq.scale, fq.dtype)


def _softmax(m: QATOp) -> nn.Module:
    fq = m.activation_post_process
    if m.op.dim is None:
        raise fail("QK106", "Softmax without dim has no fixed-point form (its axis depends on "
                   "the input rank).", "pass dim explicitly, e.g. nn.Softmax(dim=1)")
    return fx.QSoftmax(m.op.dim, fq.scale, fq.dtype)


def _gelu(m: QATOp) -> nn.Module:
    fq = m.activation_post_process
    kind = "gelu_tanh" if m.op.approximate == "tanh" else "gelu"
    return fx.QLookupTable(kind, fq.scale, fq.dtype)


def _layer_norm(m: QATOp) -> nn.Module:
    op, fq = m.op, m.activation_post_process
    channels_first = kind_of(op) == "layer_norm2d"
    return fx.QLayerNorm(op.normalized_shape, op.weight, op.bias, op.eps, fq.scale, fq.dtype,
                         channel_axis=1 if channels_first else None)


# ---- float modules from functional calls (``from_call``): the call's arguments, bound by name --

def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` (or keyword ``name``) of a torch call, after the input tensor."""
    return args[i] if len(args) > i else kwargs.get(name, default)


def _hardtanh_call(a: tuple, k: dict) -> nn.Module:
    return nn.Hardtanh(float(_arg(a, k, 1, "min_val", -1.0)), float(_arg(a, k, 2, "max_val", 1.0)))


def _clamp_call(a: tuple, k: dict) -> nn.Module | None:
    lo, hi = _arg(a, k, 1, "min"), _arg(a, k, 2, "max")
    if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
        return None  # one-sided or tensor bounds: no clamp operator (QK102 names the call)
    return nn.ReLU6() if (lo, hi) == (0, 6) else nn.Hardtanh(float(lo), float(hi))


def _avg_pool_call(a: tuple, k: dict) -> nn.Module:
    return nn.AvgPool2d(_arg(a, k, 1, "kernel_size"), _arg(a, k, 2, "stride"),
                        _arg(a, k, 3, "padding", 0), bool(_arg(a, k, 4, "ceil_mode", False)),
                        bool(_arg(a, k, 5, "count_include_pad", True)),
                        _arg(a, k, 6, "divisor_override"))


def _interpolate_call(a: tuple, k: dict) -> nn.Module | None:
    mode = _arg(a, k, 3, "mode", "nearest")
    if mode == "nearest":
        return None  # integers moved, not changed: the QTensor resizes itself
    if mode != "bilinear":
        raise fail("QK106", f"interpolate(mode={mode!r}) has no fixed-point form.",
                   "use mode='nearest' or 'bilinear'")
    return nn.Upsample(_arg(a, k, 1, "size"), _arg(a, k, 2, "scale_factor"), mode="bilinear",
                       align_corners=_arg(a, k, 4, "align_corners"))


def _softmax_call(a: tuple, k: dict) -> nn.Module:
    return nn.Softmax(_arg(a, k, 1, "dim"))


def _prelu_call(a: tuple, k: dict) -> nn.Module:
    weight = _arg(a, k, 1, "weight")
    m = nn.PReLU(weight.numel())
    m.weight = weight  # the owner's parameter itself: training it trains the owner's
    return m


def _layer_norm_call(a: tuple, k: dict) -> nn.Module:
    shape, weight, bias = _arg(a, k, 1, "normalized_shape"), _arg(a, k, 2, "weight"), \
        _arg(a, k, 3, "bias")
    m = nn.LayerNorm(shape, float(_arg(a, k, 4, "eps", 1e-5)),
                     elementwise_affine=weight is not None, bias=bias is not None)
    if weight is not None:  # the owner's parameters themselves
        m.weight = weight
    if bias is not None:
        m.bias = bias
    return m


def _functional(m: FloatFunctional) -> nn.Module:
    fq = m.activation_post_process
    return fx.QFunctional(fq.scale, fq.dtype, m.fused_activation)


OPS: tuple[Op, ...] = (
    # the region's entry and exit
    Op("quant", (QuantStub,), fixed_point=_quant),
    Op("dequant", (DeQuantStub,), keeps_scale=True, fixed_point=lambda m: fx.QDeQuantStub()),
    # GEMMs: int32 accumulation, per-channel requantization (or high-precision output)
    Op("conv2d", (nn.Conv2d, FusedConv2d), qat="weighted", qat_class=QATConv2d,
       fixed_point=fx.QConv2d, gemm=True),
    Op("linear", (nn.Linear, FusedLinear), qat="weighted", qat_class=QATLinear,
       fixed_point=fx.QLinear, gemm=True),
    Op("conv_transpose2d", (nn.ConvTranspose2d,), qat="weighted", qat_class=QATConvTranspose2d,
       fixed_point=fx.QConvTranspose2d, gemm=True, missing_on=frozenset({"bernoulli"})),
    Op("matmul", functional=("matmul",), fixed_point=_functional, gemm=True,
       missing_on=frozenset({"bernoulli"}), functions=("matmul", "__matmul__", "bmm", "mm"),
       call="binary"),
    Op("batchnorm2d", (nn.BatchNorm2d,)),  # folded into the conv before, or alone, by fuse
    # integers moved, not changed: the input's scale carries through
    Op("relu", (nn.ReLU,), keeps_scale=True),
    Op("max_pool2d", (nn.MaxPool2d,), keeps_scale=True),
    Op("flatten", (nn.Flatten,), keeps_scale=True),
    Op("reshape", keeps_scale=True),
    Op("identity", (nn.Identity,), keeps_scale=True),
    Op("dropout", (nn.Dropout,), keeps_scale=True,
       names=("torchvision.ops.stochastic_depth.StochasticDepth",)),  # identity in eval
    Op("permute", keeps_scale=True, names=("torchvision.ops.misc.Permute",)),
    Op("upsample_nearest", keeps_scale=True),  # nn.Upsample(mode="nearest"): see kind_of
    # their own output scale
    Op("relu6", (nn.ReLU6,), qat="output", fixed_point=_clamp, functions=("relu6",),
       call="module", from_call=lambda a, k: nn.ReLU6()),
    Op("hardtanh", (nn.Hardtanh,), qat="output", fixed_point=_clamp, missing_on=_OLD_BPU,
       functions=("hardtanh", "hardtanh_"), call="module", from_call=_hardtanh_call),
    Op("clamp", qat="output", fixed_point=_clamp, missing_on=_OLD_BPU,
       functions=("clamp", "clamp_", "clip"), call="module", from_call=_clamp_call),
    Op("avg_pool2d", (nn.AvgPool2d,), qat="output", fixed_point=_avg_pool,
       functions=("avg_pool2d",), call="module", from_call=_avg_pool_call),
    Op("adaptive_avg_pool2d", (nn.AdaptiveAvgPool2d,), qat="output",
       fixed_point=_adaptive_avg_pool, functions=("adaptive_avg_pool2d",), call="module",
       from_call=lambda a, k: nn.AdaptiveAvgPool2d(_arg(a, k, 1, "output_size"))),
    Op("upsample_bilinear", qat="output", fixed_point=_bilinear, functions=("interpolate",),
       call="module", from_call=_interpolate_call),
    *(Op(k, (t,), qat="output", fixed_point=_lut, lut=True, missing_on=_OLD_BPU,
         functions=(k, k + "_"), call="module", from_call=lambda a, kw, t=t: t())
      for k, t in (("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh), ("silu", nn.SiLU),
                   ("hardswish", nn.Hardswish), ("hardsigmoid", nn.Hardsigmoid))),
    # sections 14-16: a compare-and-select, lookup tables, a division and an rsqrt, which the
    # old cores lack
    Op("prelu", (nn.PReLU,), qat="output", fixed_point=_prelu, missing_on=_OLD_BPU,
       functions=("prelu",), call="module", from_call=_prelu_call),
    Op("leaky_relu", (nn.LeakyReLU,), qat="output", fixed_point=_prelu, missing_on=_OLD_BPU,
       functions=("leaky_relu", "leaky_relu_"), call="module",
       from_call=lambda a, k: nn.LeakyReLU(float(_arg(a, k, 1, "negative_slope", 0.01)))),
    Op("softmax", (nn.Softmax,), qat="output", fixed_point=_softmax, lut=True,
       missing_on=_OLD_BPU, functions=("softmax",), call="module", from_call=_softmax_call),
    Op("gelu", (nn.GELU,), qat="output", fixed_point=_gelu, lut=True, missing_on=_OLD_BPU,
       functions=("gelu",), call="module",
       from_call=lambda a, k: nn.GELU(approximate=k.get("approximate", "none"))),
    Op("layer_norm", (nn.LayerNorm,), qat="output", fixed_point=_layer_norm,
       missing_on=_OLD_BPU, functions=("layer_norm",), call="module",
       from_call=_layer_norm_call),
    # channels-first (normalises axis 1 of NCHW): timm's and torchvision's convnext LayerNorm2d
    Op("layer_norm2d", qat="output", fixed_point=_layer_norm, missing_on=_OLD_BPU,
       names=("timm.layers.norm.LayerNorm2d", "torchvision.models.convnext.LayerNorm2d")),
    # tensor arithmetic: FloatFunctional methods (one instance per call site), and the same
    # operators written as torch calls in forward (one generated FloatFunctional per site)
    Op("add", functional=("add", "add_relu"), fixed_point=_functional,
       functions=("add", "add_", "__add__", "__radd__", "__iadd__"), call="binary"),
    Op("add_scalar", functional=("add_scalar",), fixed_point=_functional),
    Op("sub", functional=("sub",), fixed_point=_functional,
       functions=("sub", "sub_", "subtract", "__sub__", "__isub__", "__rsub__", "rsub"),
       call="binary"),
    Op("mul", functional=("mul",), fixed_point=_functional,
       functions=("mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"), call="binary"),
    Op("mul_scalar", functional=("mul_scalar",), fixed_point=_functional,
       functions=("div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"),
       call="binary"),
    Op("cat", functional=("cat", "concat"), fixed_point=_functional,
       functions=("cat", "concat", "concatenate"), call="list"),
    Op("stack", functional=("stack",), fixed_point=_functional, functions=("stack",),
       call="list"),
    Op("sum", functional=("sum",), fixed_point=_functional, functions=("sum",), call="reduce"),
    Op("mean", functional=("mean",), fixed_point=_functional, functions=("mean",),
       call="reduce"),
    Op("maximum", functional=("maximum",), fixed_point=_functional, functions=("maximum",),
       call="binary"),
    Op("minimum", functional=("minimum",), fixed_point=_functional, functions=("minimum",),
       call="binary"),
)
BY_KIND: dict[str, Op] = {op.kind: op for op in OPS}
_BY_TYPE: dict[type, Op] = {t: op for op in OPS for t in op.modules}
_BY_METHOD: dict[str, Op] = {f: op for op in OPS for f in op.functional}
_BY_NAME: dict[str, Op] = {name: op for op in OPS for name in op.names}
# torch function / tensor method name -> its row (functional call sites)
BY_FUNCTION: dict[str, Op] = {f: op for op in OPS for f in op.functions}

ALL_KINDS = frozenset(BY_KIND)
GEMM_KINDS = frozenset(op.kind for op in OPS if op.gemm)
LUT_KINDS = frozenset(op.kind for op in OPS if op.lut)
# Functions allowed on quantized values in ``forward`` (everything else must be a module or a
# FloatFunctional method, rule QK102).
FUNCTIONS_ON_QUANTIZED = frozenset({
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
    "__getitem__", "relu", "relu_", "max_pool2d", "_max_pool2d", "dropout", "interpolate",
    "size", "dim", "chunk", "split", "repeat", "expand", "pad", "adaptive_max_pool2d", "clone",
    "detach", "max_pool2d_with_indices",
})


def _by_type(t: type) -> Op | None:
    for base in t.__mro__:  # a subclass of a listed module is that kind
        op = _BY_NAME.get(f"{base.__module__}.{base.__qualname__}") or _BY_TYPE.get(base)
        if op is not None:
            return op
    return None


def lookup(module: nn.Module | None, functional_op: str | None = None) -> Op | None:
    """The row of a module (float, QAT or its wrapped op) or of a FloatFunctional method."""
    if functional_op is not None:
        return _BY_METHOD.get(functional_op)
    if module is None or isinstance(module, (FloatFunctional, FakeQuantize)):
        return None
    if isinstance(module, QATOp):
        return lookup(module.op)
    if isinstance(module, nn.Upsample):
        return BY_KIND.get({"nearest": "upsample_nearest",
                            "bilinear": "upsample_bilinear"}.get(module.mode, ""))
    return _by_type(type(module))


def kind_of(module: nn.Module | None, functional_op: str | None = None) -> str | None:
    """The op kind of a module or FloatFunctional call, or None when qatkit has no row."""
    op = lookup(module, functional_op)
    return op.kind if op is not None else None


# the name older modules use
op_kind = kind_of


def _float_row(module: nn.Module | None) -> Op | None:
    """The row of a float module (not yet swapped for its QAT form)."""
    if isinstance(module, (QATOp, _QATWeighted)):
        return None
    return lookup(module)


def keeps_scale(module: nn.Module) -> bool:
    """Modules that move integers without changing them (the input's scale carries)."""
    op = _float_row(module)
    return op is not None and op.keeps_scale


def has_own_output(module: nn.Module) -> bool:
    """Float value-changing ops that ``prepare`` gives their own output fake quant."""
    op = _float_row(module)
    return op is not None and op.qat == "output"


def is_weighted(module: nn.Module) -> bool:
    """Float conv/linear modules that ``prepare`` swaps for a QAT module."""
    op = _float_row(module)
    return op is not None and op.qat == "weighted"


def module_type_names() -> set[str]:
    """Names of the module types qatkit quantizes (for messages)."""
    return {t.__name__ for op in OPS for t in op.modules}


def to_qat(module: nn.Module, qconfig: object, pow2: bool, output_mode: str) -> nn.Module | None:
    """The QAT form of a float module (None: it stays as it is)."""
    op = _float_row(module)
    if op is None or op.qat is None:
        return None
    if op.qat == "weighted":
        assert op.qat_class is not None
        return op.qat_class.from_float(module, qconfig, pow2, output_mode)
    return QATOp(module, qconfig, pow2)


def _float16(module: nn.Module) -> bool:
    fq = getattr(module, "activation_post_process", None)
    return isinstance(fq, FakeQuantize) and fq.is_float16


def to_fixed_point(module: nn.Module) -> nn.Module | None:
    """The fixed-point form of a prepared module (None: it stays as it is). An output fake
    quant in float16 makes the float16 form (``qatkit.fixed_point.float16``, spec section 19),
    except for a GEMM, which keeps integer inputs and gets a float16 output."""
    if isinstance(module, QuantStub):
        if not isinstance(module.activation_post_process, FakeQuantize):
            return None
        return f16.QFloat16QuantStub() if _float16(module) else _quant(module)
    if isinstance(module, FloatFunctional):
        if not isinstance(module.activation_post_process, FakeQuantize):
            return None
        return f16.QFloat16Functional(module.fused_activation) if _float16(module) \
            else _functional(module)
    if isinstance(module, DeQuantStub):
        return fx.QDeQuantStub()
    if not isinstance(module, (QATOp, _QATWeighted)):
        return None
    op = lookup(module)
    if op is None or op.fixed_point is None:
        return None
    if isinstance(module, QATOp) and _float16(module):
        return f16.QFloat16Op(module.op, op.kind)
    return op.fixed_point(module)


def unsupported_ops(march: March | str) -> frozenset[str]:
    """The op kinds ``march`` lacks."""
    name = march.name if isinstance(march, March) else MARCHES[march].name
    return frozenset(op.kind for op in OPS if name in op.missing_on)


__all__ = ["ALL_KINDS", "BY_FUNCTION", "BY_KIND", "FUNCTIONS_ON_QUANTIZED", "GEMM_KINDS",
           "LUT_KINDS", "OPS", "Op", "has_own_output", "is_weighted", "keeps_scale", "kind_of",
           "lookup", "module_type_names", "op_kind", "to_fixed_point", "to_qat", "unsupported_ops"]
