"""QK106: a module in the quantized region that qatkit cannot quantize.

Either its type has no quantized form (``ops.op_kind`` is None: ELU, Softplus, GroupNorm, a
custom leaf module...), or a supported type is configured in a way the fixed-point
model does not implement (string padding, a non-zero padding mode, Softmax without dim,
AdaptiveAvgPool2d with an input size that is not a multiple of the output size, a BatchNorm2d
that was not folded into a conv). Caught at prepare instead of failing at convert.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn as nn

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import is_marker, region
from qatkit.quantization import trace as tr
from qatkit.quantization.registry import module_type_names, op_kind

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def supported_types() -> str:
    names = {n for n in module_type_names()
             if not n.startswith("Fused")}  # made by fuse, not written by users
    names |= {"Upsample(mode='nearest'|'bilinear')", "BatchNorm2d (folded by fuse)",
              "QuantStub", "FloatFunctional methods"}
    return ", ".join(sorted(names, key=str.lower))


def _type_name(mod: nn.Module) -> str:
    t = type(mod)
    return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn.") else \
        f"{t.__module__}.{t.__qualname__}"


def _config_problem(g: tr.Graph, node: tr.Node, mod: nn.Module) -> tuple[str, str] | None:
    """(problem, fix) for a supported type used in a way the fixed-point model lacks."""
    kind = op_kind(mod)
    if kind == "batchnorm2d":
        return ("a BatchNorm2d that is not folded into a conv has no quantized form (it would "
                "stay float and receive integer tensors)",
                "prepare with fuse=True (the default): fuse folds conv+BN, and a standalone BN "
                "into a 1x1 depthwise conv; each BN must be called once")
    if kind in ("conv2d", "conv_transpose2d") and (isinstance(
            getattr(mod, "padding", 0), str) or getattr(mod, "padding_mode", "zeros") != "zeros"):
        return (f"padding={mod.padding!r}, padding_mode={mod.padding_mode!r}: the "
                "fixed-point conv supports numeric padding with zeros only",
                "use padding=(ph, pw) and padding_mode='zeros' (or pad with a module "
                "before the QuantStub)")
    if kind == "softmax" and mod.dim is None:
        return ("Softmax without dim has no fixed-point form (its axis depends on the input "
                "rank)", "pass dim explicitly, e.g. nn.Softmax(dim=1)")
    if kind == "max_pool2d" and getattr(mod, "return_indices", False):
        return ("MaxPool2d with return_indices=True has no fixed-point form",
                "use return_indices=False in the quantized region")
    if kind == "adaptive_avg_pool2d":
        src = next((g.nodes[i] for i in node.inputs if i >= 0), None)
        out = mod.output_size
        if src is not None and src.shape is not None and len(src.shape) >= 2:
            hw = src.shape[-2:]
            o = (out, out) if isinstance(out, int) else tuple(
                hw[i] if v is None else v for i, v in enumerate(out))
            if (hw[0] % o[0] or hw[1] % o[1]) and (o[0] % hw[0] or o[1] % hw[1]):
                return (f"AdaptiveAvgPool2d from {tuple(hw)} to {o}: the fixed-point average "
                        "needs an input size that is a multiple of the output size (or an "
                        "output size that is a multiple of the input size)",
                        "use an input size divisible by the output size, or AvgPool2d")
    return None


def _check(ctx: Context) -> Iterator[Finding]:
    g = ctx.graph
    if g is None:
        return
    reg = region(ctx)
    from qatkit.doctor.rules.qk003_high_precision_output import head_activations
    # a head of a type with no quantized form, before the DeQuantStub, is QK003's finding
    seen: set[str] = {t for t in head_activations(ctx) if op_kind(ctx.module(t)) is None}
    for node in g.nodes:
        mod = node.module
        if node.kind != "module" or node.index not in reg or mod is None or \
                node.target in seen or is_marker(mod) or isinstance(mod, _CONTAINERS):
            continue
        seen.add(node.target)
        inner = getattr(mod, "op", mod) if type(mod).__name__ == "QATOp" else mod
        if op_kind(mod) is None:
            yield RULE.finding(
                node.target,
                f"'{node.target}' is a {_type_name(inner)}, which "
                "qatkit cannot quantize, but it is in the quantized region (between a "
                "QuantStub and a DeQuantStub), where it would receive integer tensors. "
                f"Supported: {supported_types()}.",
                source=node.source)
            continue
        problem = _config_problem(g, node, inner)
        if problem is not None:
            yield RULE.finding(node.target, f"'{node.target}': {problem[0]}.", fix=problem[1],
                               source=node.source)


RULE = Rule(
    code="QK106",
    name="operator qatkit cannot quantize",
    severity="error",
    stages=("prepare", "calibration", "qat", "validation"),
    summary="At prepare (and in the doctor), finds leaf modules in the quantized region whose "
            "type has no quantized form in qatkit, or whose configuration the fixed-point model "
            "does not implement, and lists the supported types.",
    why="prepare would leave such a module float inside the quantized region: QAT would train "
        "it in float, and the converted model would fail on it (or, on the chip, the compiler "
        "would). Finding it at prepare saves the calibration and training time.",
    bad="""
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ELU()                          # no quantized ELU
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        x = self.act(self.conv(self.quant(x)))
        return self.dequant(self.fc(self.pool(x).flatten(1)))


calib = qk.prepare(Net(), x, qconfig=qk.default_calibration_qconfig())
# [QK106] module 'act': ELU has no quantized form in qatkit ...
""",
    good="""
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.SiLU()                         # a lookup-table op (or ReLU)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        x = self.act(self.conv(self.quant(x)))
        return self.dequant(self.fc(self.pool(x).flatten(1)))


calib = qk.prepare(Net(), x, qconfig=qk.default_calibration_qconfig())
qk.calibrate(calib, train_batches[:8])
quantized = qk.convert(calib)
""",
    fix="replace it with a supported module, or move it out of the quantized region "
        "(DeQuantStub before it, QuantStub after it) so it runs in float",
    check=_check,
)
