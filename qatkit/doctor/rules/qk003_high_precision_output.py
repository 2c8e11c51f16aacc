"""QK003: a conv/linear whose only consumers are DeQuantStubs keeps a quantized output.

Float stage / prepare: the GEMMs ``prepare.high_precision_modules`` would pick if their qconfig
allowed it (``QConfig(high_precision_output=False)``). Prepared, QAT and converted models: a
conv/linear still in ``output_mode == "quantized"`` whose consumers (through reshapes) are all
DeQuantStubs in the traced forward.

Also judged on the data flow of any stage with a graph:

* a quantized value that leaves the model without passing a DeQuantStub (a graph output inside
  the deploy region): its consumer gets int8 values, never a high-precision output;
* detection heads (conv/linear outputs) joined by one ``cat`` whose only consumers are
  DeQuantStubs: the cat requantizes every head to one common int8 scale, so no head can keep a
  high-precision output (dequantize each head, concatenate in float);
* a sigmoid/softmax (or other lookup-table activation) between the last conv/linear and its
  DeQuantStub: the activation is rounded to int8 in a lookup table and the GEMM in front of it
  loses its high-precision output (apply it in float, after the DeQuantStub).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import qconfigs, region, user_type
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


_HEAD_ACTIVATIONS = ("Sigmoid", "Softmax", "LogSoftmax", "Tanh", "Hardsigmoid", "Softmax2d")


def _is_dequant(n: tr.Node) -> bool:
    from qatkit.fixed_point.modules import QDeQuantStub
    from qatkit.quantization.stubs import DeQuantStub
    return isinstance(n.module, (DeQuantStub, QDeQuantStub))


def _producer_module(g: tr.Graph, n: tr.Node, depth: int = 0) -> tr.Node:
    """``n`` itself, or for a shape op the module node it reshapes."""
    if n.kind != "function" or depth > 32:
        return n
    first = next((i for i in n.inputs if i >= 0), -1)
    return n if first < 0 else _producer_module(g, g.nodes[first], depth + 1)


def _gemm(n: tr.Node) -> bool:
    from qatkit.quantization.registry import GEMM_KINDS, op_kind
    return n.kind == "module" and (_weighted(n.module) or op_kind(n.module) in GEMM_KINDS)


def _head_kind(n: tr.Node) -> str | None:
    """The activation's name when ``n`` is a sigmoid/softmax-like module, in float, QAT
    (``QATOp`` wrapping it) or fixed-point (``QLookupTable`` of that kind) form."""
    if n.kind != "module" or n.module is None:
        return None
    from qatkit.fixed_point.modules import QLookupTable
    from qatkit.quantization.qat import QATOp
    from qatkit.quantization.registry import kind_of
    mod = n.module.op if isinstance(n.module, QATOp) else n.module
    kind = mod.kind if isinstance(mod, QLookupTable) else kind_of(mod)
    for name in (type(mod).__name__, str(kind)):
        for act in _HEAD_ACTIVATIONS:
            if name.lower() == act.lower():
                return act
    return None


def head_activations(ctx: Context) -> set[str]:
    """Sigmoid/softmax-like modules in the region whose only consumers are DeQuantStubs:
    QK003's finding (QK106 leaves an unsupported one, e.g. Softmax, to QK003)."""
    g = ctx.graph
    if g is None:
        return set()
    inside = region(ctx)
    out = set()
    for n in g.nodes:
        if n.index in inside and not n.is_output and _head_kind(n) is not None:
            users = g.consumers(n, through_shape_ops=True)
            if users and all(_is_dequant(u) for u in users):
                out.add(n.target)
    return out


def _data_flow(ctx: Context, where: str) -> Iterator[Finding]:
    """The three data-flow shapes of a lost high-precision output (module docstring)."""
    g = ctx.graph
    inside = region(ctx)
    seen: set[str] = set()
    for n in g.nodes:
        if n.index not in inside or n.kind == "input":
            continue
        if n.is_output and not _is_dequant(n):
            p = _producer_module(g, n)
            if p.target in seen:
                continue
            seen.add(p.target)
            what = f"{user_type(p.module)} '{p.target}'" if p.module is not None else \
                f"{p.op}()"
            yield RULE.finding(
                p.target if p.module is not None else "",
                f"the output of {what} leaves the model without passing a DeQuantStub: the "
                "caller receives quantized values (int8 in the deployed model) instead of a "
                f"high-precision{where} output, and the last rounding step stays in the model.",
                fix="end every output path with its own DeQuantStub: "
                    "return self.dequant(...) for each returned tensor",
                source=n.source)
            continue
        users = g.consumers(n, through_shape_ops=True)
        if not users or not all(_is_dequant(u) for u in users) or n.is_output:
            continue
        if n.kind == "functional" and n.op in ("cat", "concat", "stack"):
            heads = [_producer_module(g, p) for p in g.producers(n)]
            heads = [h for h in heads if _gemm(h) and
                     all(u.index == n.index for u in g.consumers(h, through_shape_ops=True))]
            if len(heads) >= 2 and n.target not in seen:
                seen.add(n.target)
                names = ", ".join(f"'{h.target}'" for h in heads)
                yield RULE.finding(
                    n.target,
                    f"heads {names} are concatenated by '{n.target}' ({n.op}) before one "
                    "DeQuantStub: the cat requantizes them to one common int8 scale, so none "
                    f"of them can keep a high-precision{where} output, and small-range heads "
                    "(e.g. box offsets next to class scores) lose most of their resolution.",
                    fix=f"give each head its own DeQuantStub and concatenate in float after "
                        f"them: torch.cat([self.dq_a(head_a), self.dq_b(head_b)], 1); remove "
                        f"'{n.target}' from the quantized region",
                    source=n.source)
            continue
        act = _head_kind(n)
        if act is not None and n.target not in seen:
            from qatkit.quantization.registry import op_kind
            # no quantized form at all (Softmax): the model cannot be prepared as written
            unsupported = op_kind(n.module) is None
            gemms = [_producer_module(g, p) for p in g.producers(n)]
            gemm = next((h for h in gemms if _gemm(h)), None)
            seen.add(n.target)
            front = f" after {user_type(gemm.module)} '{gemm.target}'" if gemm else ""
            yield RULE.finding(
                n.target,
                f"{act} '{n.target}'{front} is the last op before the DeQuantStub, inside the "
                "quantized region: " + ("it has no quantized form, and " if unsupported else
                                        "it runs as an int8 lookup table and ")
                + (f"'{gemm.target}' loses its high-precision{where} output" if gemm else
                   "its result is rounded to int8")
                + "; the output head is computed with the coarsest precision of the model."
                + (" Prepare refuses the model as written." if unsupported else ""),
                fix=f"move the {act.lower()} after the DeQuantStub (float post-processing, e.g. "
                    f"torch.{act.lower()}(self.dequant(logits)) or in the loss/decoder), so "
                    + (f"'{gemm.target}'" if gemm else "the last conv/linear")
                    + " feeds the DeQuantStub directly",
                source=n.source, severity="error" if unsupported else None)


def _check(ctx: Context) -> Iterator[Finding]:
    g = ctx.graph
    if g is None:
        return
    hp = ctx.march.high_precision_output if ctx.march is not None else "qint32"
    yield from _data_flow(ctx, f" ({hp})" if hp else "")
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
            f"{user_type(n.module)} output goes only to DeQuantStub {deq}, yet it is "
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
    bad="""
qconfig = qk.QConfig(high_precision_output=False)   # e.g. a hand-made qconfig
calib = qk.prepare(Net(), x, qconfig=qconfig)
# [QK003] module 'fc': Linear output goes only to DeQuantStub 'dequant', yet it is rounded ...
""",
    good="""
calib = qk.prepare(Net(), x, qconfig=qk.default_calibration_qconfig())  # high_precision_output
qk.calibrate(calib, train_batches[:8])
quantized = qk.convert(calib)                # 'fc' keeps an int32 output
""",
    fix="keep QConfig.high_precision_output=True (the default) for output layers that feed "
        "only DeQuantStubs",
    check=_check,
)
