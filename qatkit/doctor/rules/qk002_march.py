"""QK002: march missing, changed between stages, not the declared processor's, or lacking a
dtype/operator the model uses ("would fail to compile for <march>").

``get_march(required=True)`` raises the missing-march error inside ``prepare``; this rule also
reports it for the doctor. The march recorded at prepare (``qatkit.quantization.meta``) is compared
with the current one at ``set_fake_quantize`` and ``convert``.
"""

from __future__ import annotations

from collections.abc import Iterator

from qatkit.base.errors import QatkitError
from qatkit.base.march import March, resolve
from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import qconfigs, recorded_march, region, sources
from qatkit.quantization import meta
from qatkit.quantization.registry import is_weighted, op_kind, unsupported_ops


def _compile(march: March) -> str:
    return f"would fail to compile for {march.name}"


def _label(ctx: Context) -> str:
    """The current march, named with the declared processor when it is that one's march:
    "'nash-m' (the march of J6M)"."""
    facts = meta.get(ctx.model)
    processor = ctx.processor or (facts.processor if facts else None)
    name = ctx.march.name if ctx.march is not None else "?"
    if processor:
        try:
            if resolve(processor=processor).name == name:
                return f"{name!r} (the march of {processor})"
        except QatkitError:
            pass
    return repr(name)


def _declared(ctx: Context) -> Iterator[Finding]:
    if ctx.march is None:
        if ctx.stage in ("float", "prepare") and recorded_march(ctx) is None:
            yield RULE.finding("", "no march is set, so qatkit cannot know which dtypes, "
                               "operators and scale rules the target processor has.",
                               fix="call qk.set_march('nash-e') or "
                                   "qk.set_march(processor='J6E') before prepare")
        return
    facts = meta.get(ctx.model)
    processor = ctx.processor or (facts.processor if facts else None)
    if processor:
        try:
            want = resolve(processor=processor)
        except QatkitError as e:
            yield RULE.finding("", e.message, fix=e.fix)
            return
        if want.name != ctx.march.name:
            yield RULE.finding("", f"march {ctx.march.name!r} is not the march of the declared "
                               f"processor {processor!r}, which needs {want.name!r}; the model "
                               "would fail to compile or deploy with a different accuracy.",
                               fix=f"qk.set_march({want.name!r}) (or "
                                   f"qk.set_march(processor={processor!r})) before prepare")
    rec = recorded_march(ctx)
    if rec is not None and rec != ctx.march.name and ctx.stage != "prepare":
        yield RULE.finding("", f"this model was prepared for march {rec!r} but the current "
                           f"march is {_label(ctx)}: its scales, dtypes and operators were "
                           f"chosen for {rec!r}.",
                           fix=f"qk.set_march({rec!r}) for every stage of this model, or "
                               f"prepare and calibrate again under {ctx.march.name!r}")


def _dtypes_at_prepare(ctx: Context, march: March) -> Iterator[Finding]:
    from qatkit.quantization.prepare import high_precision_modules
    from qatkit.quantization.stubs import QuantStub
    g, qc = ctx.graph, qconfigs(ctx)
    inside = region(ctx)
    hp = high_precision_modules(g, qc)
    seen: set[str] = set()
    for n in g.nodes:
        if n.kind not in ("module", "functional") or n.index not in inside or n.target in seen:
            continue
        seen.add(n.target)
        q = qc.get(n.target)
        if q is None:
            continue
        bad: list[str] = []
        dtype = q.activation.dtype if q.activation is not None else None
        if isinstance(n.module, QuantStub) and n.module.dtype != "qint8" and \
                dtype in (None, "qint8"):  # as prepare's _swap: the stub's own dtype wins
            dtype = n.module.dtype
        if dtype is not None and n.target not in hp and not march.supports_dtype(dtype):
            bad.append(f"activation dtype {dtype}")
        if is_weighted(n.module) and q.weight is not None and \
                q.weight.dtype not in march.weight_dtypes:
            bad.append(f"weight dtype {q.weight.dtype}")
        if bad:
            yield RULE.finding(n.target, f"its qconfig asks for {' and '.join(bad)}, which "
                               f"{march.name} does not have ({_offers(march)}): the model "
                               f"{_compile(march)}.", fix=_dtype_fix(n.target, march),
                               source=n.source)


def _dtypes_of_modules(ctx: Context, march: March) -> Iterator[Finding]:
    from qatkit.doctor.rules.common import owner_name
    from qatkit.fixed_point.modules import QModule
    from qatkit.quantization.fake_quant import FakeQuantize
    done: set[str] = set()
    for name, m in ctx.model.named_modules():
        dtype, kind = None, "activation"
        if isinstance(m, FakeQuantize):
            dtype, kind = m.dtype, ("weight" if m.is_weight else "activation")
            name = owner_name(name)
        elif isinstance(m, QModule) and getattr(m, "output_mode", "quantized") == "quantized":
            dtype = m.out_dtype
        if dtype is None or name in done:
            continue
        ok = dtype in (march.weight_dtypes if kind == "weight" else march.activation_dtypes)
        if not ok:
            done.add(name)
            yield RULE.finding(name, f"it uses {kind} dtype {dtype}, which {march.name} does "
                               f"not have ({_offers(march)}): the model {_compile(march)}.",
                               fix=_dtype_fix(name, march))


def _ops(ctx: Context, march: March) -> Iterator[Finding]:
    g = ctx.graph
    inside = region(ctx)
    by_problem: dict[tuple[str, str], list] = {}
    for n in g.nodes:
        if n.index not in inside:
            continue
        if n.kind in ("module", "functional"):
            kind = op_kind(n.module, n.op if n.kind == "functional" else None)
            if kind in unsupported_ops(march):
                by_problem.setdefault((n.target, f"operator {kind!r}"), []).append(n)
            if kind == "add" and march.max_add_channels and n.shape and len(n.shape) > 1 \
                    and n.shape[1] > march.max_add_channels:
                by_problem.setdefault((n.target, f"add over {n.shape[1]} channels (at most "
                                       f"{march.max_add_channels})"), []).append(n)
        if march.max_rank and n.shape is not None and len(n.shape) > march.max_rank:
            by_problem.setdefault((n.target, f"{len(n.shape)}-D tensors (at most "
                                   f"{march.max_rank}-D)"), []).append(n)
    for (name, what), nodes in by_problem.items():
        yield RULE.finding(name, f"{march.name} does not support {what}: the model "
                           f"{_compile(march)}.",
                           fix=f"replace it with an operator {march.name} supports, move it "
                               "after the DeQuantStub, or target a march that has it",
                           source=sources(nodes))


def _offers(march: March) -> str:
    return f"activations {'/'.join(march.activation_dtypes)}, weights " \
           f"{'/'.join(march.weight_dtypes)}"


def _dtype_fix(name: str, march: March) -> str:
    return (f"use {march.activation_dtypes[0]} for {name!r} (e.g. "
            f"QConfigMapping(...).set_module_name({name!r}, qk.default_qat_qconfig())), or "
            f"target a march that has this dtype")


def _check(ctx: Context) -> Iterator[Finding]:
    yield from _declared(ctx)
    march = ctx.march
    if march is None:
        return
    if ctx.stage in ("float", "prepare") and ctx.graph is not None:
        yield from _dtypes_at_prepare(ctx, march)
    elif ctx.stage not in ("float", "prepare"):
        yield from _dtypes_of_modules(ctx, march)
    if ctx.graph is not None:
        yield from _ops(ctx, march)


RULE = Rule(
    code="QK002",
    name="march",
    severity="error",
    stages=("float", "prepare", "calibration", "qat", "validation", "convert", "converted",
            "evaluate"),
    summary=(
        "Checks the march (BPU architecture): that one is set before prepare; that it stays "
        "the same from prepare through calibration, QAT and convert (the march is recorded in "
        "the prepared model and its checkpoints); that it is the march of the processor "
        "declared with prepare(..., processor=...) (J6E -> nash-e, J5 -> bayes, ...); and that "
        "the march has every dtype and operator the model uses (e.g. no int16 and no "
        "lookup-table ops on bernoulli2), reported as 'would fail to compile for <march>'."),
    why=(
        "The march decides which dtypes and operators compile and how scales are formed. A "
        "model prepared for the wrong march fails to compile for the real chip, or compiles "
        "with different arithmetic so the deployed accuracy differs from what training "
        "measured. Changing the march half-way mixes scales made for two chips."),
    bad="""
qk.set_march("bayes")                       # but the board is a J6E (nash-e)
calib = qk.prepare(Net(), x, qconfig=qk.default_calibration_qconfig(),
                   processor="J6E")         # [QK002] march 'bayes' is not the march ...
""",
    good="""
qk.set_march(processor="J6E")               # -> nash-e, the march of the target chip
calib = qk.prepare(Net(), x, qconfig=qk.default_calibration_qconfig(), processor="J6E")
qk.calibrate(calib, train_batches[:8])   # the same march for calibration, QAT, convert
quantized = qk.convert(calib)
""",
    fix="set the march of the target processor once (qk.set_march(processor='J6E')) and keep "
        "it for prepare, calibration, QAT and convert; use only dtypes and operators it has",
    check=_check,
)
