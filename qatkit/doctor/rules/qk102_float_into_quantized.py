"""QK102: float values, torch functions or float modules where the model computes on integers.

Three cases, all read off the data flow of a traced forward:

1. a node in the deploy region with quantized *and* float inputs (a tensor that reached it
   without passing a QuantStub: the raw input, a DeQuantStub's output, a parameter or buffer);
2. a torch function or tensor method applied to quantized values other than the shape-only and
   scale-keeping ones in ``ops.FUNCTIONS_ON_QUANTIZED`` (``x + y``, ``torch.cat``, ``x.mean()``
   written in ``forward`` instead of a FloatFunctional or a module);
3. a quantizable module in the region whose qconfig is None (or has no activation spec), so
   prepare keeps it float and the fixed-point model would feed it integer tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import output_fake_quant, region, user_type
from qatkit.quantization import trace as tr
from qatkit.quantization.registry import (
    FUNCTIONS_ON_QUANTIZED,
    has_own_output,
    is_weighted,
    op_kind,
)
from qatkit.quantization.stubs import FloatFunctional, QuantStub

# What to use instead of a torch function on quantized values.
_INSTEAD = {
    "__add__": "FloatFunctional.add", "__iadd__": "FloatFunctional.add",
    "__radd__": "FloatFunctional.add", "add": "FloatFunctional.add",
    "add_": "FloatFunctional.add", "__sub__": "FloatFunctional.sub",
    "__rsub__": "FloatFunctional.sub", "__isub__": "FloatFunctional.sub",
    "sub": "FloatFunctional.sub", "__mul__": "FloatFunctional.mul or mul_scalar",
    "__rmul__": "FloatFunctional.mul or mul_scalar", "__imul__": "FloatFunctional.mul",
    "mul": "FloatFunctional.mul or mul_scalar", "cat": "FloatFunctional.cat",
    "concat": "FloatFunctional.cat", "concatenate": "FloatFunctional.cat",
    "stack": "FloatFunctional.stack", "matmul": "FloatFunctional.matmul",
    "__matmul__": "FloatFunctional.matmul", "bmm": "FloatFunctional.matmul",
    "sum": "FloatFunctional.sum", "mean": "FloatFunctional.mean or nn.AdaptiveAvgPool2d",
    "maximum": "FloatFunctional.maximum", "minimum": "FloatFunctional.minimum",
    "adaptive_avg_pool2d": "nn.AdaptiveAvgPool2d", "avg_pool2d": "nn.AvgPool2d",
    "relu6": "nn.ReLU6", "hardtanh": "nn.Hardtanh", "sigmoid": "nn.Sigmoid",
    "tanh": "nn.Tanh", "silu": "nn.SiLU", "hardswish": "nn.Hardswish",
    "hardsigmoid": "nn.Hardsigmoid", "upsample_bilinear2d": "nn.Upsample(mode='bilinear')",
    "chunk": "slicing (x[:, :c], x[:, c:])", "split": "slicing (x[:, :c], x[:, c:])",
    "pad": "the padding argument of the next conv or pool",
}


def _float_source(g: tr.Graph, reg: set[int], i: int) -> str | None:
    """Describe a float input of a region node, or None when it is quantized."""
    if i < 0:
        return "a tensor not computed in forward (a parameter, buffer or constant)"
    if i in reg:
        return None
    p = g.nodes[i]
    out = p.output
    if isinstance(out, torch.Tensor) and not out.is_floating_point():
        return None  # an index or a mask (x[index], x.masked_fill(mask...)): no value
    if p.kind == "input":
        return "the model input (no QuantStub on this path)"
    if p.kind == "module":
        return f"the float output of {type(p.module).__name__} '{p.target}'"
    return f"the float result of {p.op}()" + (f" at {p.source}" if p.source else "")


def _stays_float(mod: nn.Module, q: object, use_qconfigs: bool) -> bool:
    """A module that must be swapped for a quantized form but will not be."""
    if use_qconfigs:  # float model at prepare: decided by the effective qconfig
        needs = is_weighted(mod) or has_own_output(mod) or isinstance(mod, FloatFunctional)
        return needs and (q is None or getattr(q, "activation", None) is None)
    # prepared model: a module of a swappable type that was not swapped
    if is_weighted(mod) or has_own_output(mod):
        return True
    return isinstance(mod, FloatFunctional) and output_fake_quant(mod) is None


def _check(ctx: Context) -> Iterator[Finding]:
    g = ctx.graph
    if g is None:
        return
    reg = region(ctx)
    at_prepare = ctx.stage in ("prepare", "float") and ctx.qconfigs is not None
    converted = ctx.stage == "converted"
    reported: set[str] = set()
    functions: dict[tuple[str, str], list[tr.Node]] = {}
    for node in g.nodes:
        if node.index not in reg or node.kind == "input":
            continue
        if isinstance(node.module, QuantStub) or type(node.module).__name__ == "QQuantStub":
            continue
        if node.kind == "function" and node.op not in FUNCTIONS_ON_QUANTIZED:
            functions.setdefault((node.op, node.source), []).append(node)
            continue
        # Constant index tensors of shape ops are not values: only a traced producer counts.
        inputs = [i for i in node.inputs if i >= 0] if node.kind == "function" else node.inputs
        floats = [s for s in (_float_source(g, reg, i) for i in inputs) if s]
        where = f" at {node.source}" if node.source else ""
        label = node.target if node.kind != "function" else ""
        if floats:
            what = (f"{type(node.module).__name__} '{node.target}'" if node.module is not None
                    else f"{node.op}(){where}")
            yield RULE.finding(
                label, f"{what} combines quantized values with {floats[0]}: a float tensor "
                "reaches a quantized op without passing a QuantStub (in the fixed-point model "
                "it has no scale and no integer form).",
                fix="pass every float tensor through its own QuantStub before it meets "
                    "quantized values, or do the op after the DeQuantStub",
                source=node.source)
            continue
        mod = node.module
        if node.kind not in ("module", "functional") or mod is None or converted or \
                node.target in reported:
            continue
        q = (ctx.qconfigs or {}).get(node.target)
        if _stays_float(mod, q, at_prepare):
            reported.add(node.target)
            kind = op_kind(mod) or type(mod).__name__
            yield RULE.finding(
                node.target,
                f"{user_type(mod)} '{node.target}' ({kind}) is in the quantized region but "
                "its qconfig is None" + ("" if q is None else " for activations")
                + ", so it stays float and would receive integer tensors in the fixed-point "
                "model.",
                fix="give it a qconfig, or leave the quantized region before it: "
                    "DeQuantStub before, QuantStub after", source=node.source)
    for (op, source), nodes in functions.items():
        floats = [s for n in nodes for s in (_float_source(g, reg, i) for i in n.inputs
                                             if i >= 0) if s]
        where = f" at {source}" if source else ""
        times = f" ({len(nodes)} calls in one forward)" if len(nodes) > 1 else ""
        instead = _INSTEAD.get(op)
        yield RULE.finding(
            "", f"torch function {op}(){where}{times} is applied to quantized values"
            + (f" (and to {floats[0]})" if floats else "") + ": it has no fixed-point form "
            "and no output observer, so the converted model cannot run it.",
            fix=(f"use {instead} (one instance per call site, created in __init__)"
                 if instead else "express it with a quantizable module or a FloatFunctional "
                 "method, or move it after the DeQuantStub"),
            source=source)


RULE = Rule(
    code="QK102",
    name="float tensor into quantized op",
    severity="error",
    stages=("prepare", "calibration", "qat", "validation", "converted"),
    summary="Finds, by data flow, (1) ops in the quantized region that also take a float "
            "tensor that did not pass a QuantStub, (2) torch functions on quantized values "
            "that have no operator: neither a scale-keeping op (shape-only ops, ReLU, max "
            "pooling, dropout, nearest resizing) nor one prepare turns into an operator per "
            "call site (`x + y`, `torch.cat`, `x.mean(...)`... are; `x.exp()` is not), naming "
            "the function and its source line, (3) quantizable modules in the region whose "
            "qconfig is None.",
    why="In the fixed-point model every value between QuantStub and DeQuantStub is an integer "
        "tensor with a scale. A float operand has no scale; a torch function has no observer, "
        "so no calibrated output scale and no integer implementation; a module kept float "
        "receives integers. Convert would produce a model that fails or computes garbage.",
    bad="""
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv1(self.quant(x))
        return self.dequant(torch.cat([y, self.conv2(y).exp()], 1))  # exp: no operator


calib = qk.prepare(Net(), x, qconfig=qk.default_calibration_qconfig())
# [QK102] torch function exp() at ... is applied to quantized values ...
""",
    good="""
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv1(self.quant(x))
        z = self.dequant(torch.cat([y, self.conv2(y)], 1))  # torch.cat: an operator
        return torch.cat([z[:, :8], z[:, 8:].exp()], 1)     # exp on float values


calib = qk.prepare(Net(), x, qconfig=qk.default_calibration_qconfig())
qk.calibrate(calib, train_batches[:8])
quantized = qk.convert(calib)
""",
    fix="express the op with one that has an operator (a module, a FloatFunctional, or a "
        "torch call prepare turns into one), or apply it after the DeQuantStub; pass float "
        "data through a QuantStub on every path by which it enters",
    check=_check,
)
