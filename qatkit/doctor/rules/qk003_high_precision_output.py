"""QK003: a conv/linear whose only consumers are DeQuantStubs keeps a quantized output.

Float stage / prepare: the GEMMs ``prepare.high_precision_modules`` would pick if their qconfig
allowed it (``QConfig(high_precision_output=False)``). Prepared, QAT and converted models: a
conv/linear still in ``output_mode == "quantized"`` whose consumers (through reshapes) are all
DeQuantStubs in the traced forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import qconfigs, region
from qatkit.quantization import trace as tr


def _only_dequant(g: tr.Graph, n: tr.Node) -> list[tr.Node]:
    """The DeQuantStub consumers of ``n`` if they are its only consumers, else []."""
    from qatkit.fixed_point.modules import QDeQuantStub
    from qatkit.quantization.stubs import DeQuantStub
    users = g.consumers(n, through_shape_ops=True)
    if n.is_output or not users or not all(isinstance(u.module, (DeQuantStub, QDeQuantStub))
                                           for u in users):
        return []
    return users


def _weighted(module: Any) -> bool:
    from qatkit.fixed_point.modules import QConv2d, QConvTranspose2d, QLinear
    from qatkit.quantization.qat import _QATWeighted
    return isinstance(module, (_QATWeighted, QConv2d, QLinear, QConvTranspose2d))


def _check(ctx: Context) -> Iterator[Finding]:
    g = ctx.graph
    if g is None:
        return
    from qatkit.quantization.registry import GEMM_KINDS, op_kind
    march = ctx.march
    if march is not None and not march.high_precision_output:
        return
    hp_dtype = march.high_precision_output if march is not None else "qint32"
    where = f" on {march.name}" if march is not None else ""
    qc = qconfigs(ctx) if ctx.stage in ("float", "prepare") else {}
    inside = region(ctx)
    for n in g.nodes:
        if n.kind != "module" or n.index not in inside or len(g.calls(n.target)) != 1:
            continue
        if _weighted(n.module):
            if getattr(n.module, "output_mode", None) != "quantized":
                continue
            app = getattr(n.module, "activation_post_process", None)
            dtype = getattr(app, "dtype", None) or getattr(n.module, "out_dtype", "qint8")
        elif ctx.stage in ("float", "prepare") and op_kind(n.module) in GEMM_KINDS:
            q = qc.get(n.target)
            if q is None or q.activation is None or q.high_precision_output:
                continue
            dtype = q.activation.dtype
        else:
            continue
        users = _only_dequant(g, n)
        if not users:
            continue
        deq = ", ".join(f"'{u.target}'" for u in users)
        yield RULE.finding(
            n.target,
            f"{type(n.module).__name__} output goes only to DeQuantStub {deq}, yet it is "
            f"rounded to {dtype}{where}; a GEMM feeding only DeQuantStubs can keep a "
            f"high-precision {hp_dtype} output, which costs nothing on the BPU and removes "
            "the last rounding step from the model's output.",
            fix=f"leave QConfig.high_precision_output=True (the default) for {n.target!r} "
                f"and prepare again, e.g. QConfigMapping(qconfig).set_module_name("
                f"{n.target!r}, qk.default_qat_qconfig())",
            source=n.source)


RULE = Rule(
    code="QK003",
    name="high-precision-output",
    severity="warning",
    stages=("float", "prepare", "calibration", "qat", "validation", "converted"),
    summary=(
        "Finds conv/linear/matmul modules whose output is consumed only by DeQuantStubs "
        "(through reshapes) but is still quantized to int8/int16, on a march that supports a "
        "high-precision (int32, or float on nash-p) output for them."),
    why=(
        "The model's output layer (classifier logits, box regression) feeds float "
        "post-processing. Rounding it to 8 bits adds quantization error exactly where accuracy "
        "is measured, for no gain: the BPU can hand out the int32 accumulator (scaled by the "
        "input and weight scales) directly."),
    bad='''
qconfig = qk.QConfig(high_precision_output=False)   # e.g. a hand-made qconfig
qat = qk.prepare(model, x, qconfig=qconfig)
# [QK003] module 'fc': Linear output goes only to DeQuantStub 'dequant', yet it is rounded ...
''',
    good='''
qat = qk.prepare(model, x, qconfig=qk.default_qat_qconfig())   # high_precision_output=True
# 'fc' keeps an int32 output in the quantized model (float in calibration and QAT)
''',
    fix="keep QConfig.high_precision_output=True (the default) for output layers that feed "
        "only DeQuantStubs",
    check=_check,
)
