"""``qk.summary(model)``: one row per quantized op of a prepared or converted model.

Each row: ``name``; ``kind`` (the row of ``qatkit.quantization.registry``, ``quant_stub`` for an
input QuantStub, ``dequant_stub`` for the exit); ``dtype_in`` / ``dtype_out`` (what flows in
and out: ``qint8``, ``qint16``, ``qint32`` for a high-precision or accumulator output,
``float32`` outside the quantized region); ``weight_dtype``; ``scale`` (the output scale) and
``weight_scale`` (min..max over output channels); ``qconfig`` (where the module's qconfig came
from: by name, by type, a ``qconfig`` attribute, or the global one, as recorded by ``prepare``);
``march`` (``yes`` when the march has this operator, else ``no``); ``high_precision`` (a GEMM
whose output stays int32 to the DeQuantStub).

``dtype_in`` needs the data flow: given ``example_inputs``, a prepared model is traced (one
forward that changes nothing) and a converted one runs once with hooks that read the input
``QTensor``s; without them ``dtype_in`` is empty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from qatkit.base.march import resolve
from qatkit.base.modules import unwrap
from qatkit.base.qtensor import QTensor
from qatkit.base.table import render
from qatkit.fixed_point import modules as fx
from qatkit.quantization import meta
from qatkit.quantization import trace as tr
from qatkit.quantization.fake_quant import FakeQuantize
from qatkit.quantization.qat import QATOp, _QATWeighted
from qatkit.quantization.registry import kind_of, unsupported_ops
from qatkit.quantization.stubs import DeQuantStub, FloatFunctional, QuantStub

COLUMNS = ("name", "kind", "dtype_in", "dtype_out", "weight_dtype", "scale", "weight_scale",
           "qconfig", "march", "high_precision")


@dataclass
class Row:
    name: str
    kind: str
    dtype_in: str = ""
    dtype_out: str = ""
    weight_dtype: str = ""
    scale: float | None = None
    weight_scale: tuple[float, float] | None = None
    qconfig: str = ""
    march: str = ""
    high_precision: bool = False


class Summary(list):
    """The rows (a list of :class:`Row`); ``str()`` is a table that fits the terminal."""

    march: str | None = None
    stage: str | None = None

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self]

    def table(self, width: int | None = None) -> str:
        def wscale(r: Row) -> str:
            if r.weight_scale is None:
                return ""
            lo, hi = r.weight_scale
            return f"{lo:.2g}" if lo == hi else f"{lo:.2g}..{hi:.2g}"
        wdtypes = sorted({r.weight_dtype for r in self if r.weight_dtype})
        one_wdtype = len(wdtypes) <= 1

        def notes(r: Row) -> str:
            return " ".join(n for n in ("hp-out" if r.high_precision else "",
                                        "not-on-march" if r.march == "no" else "") if n)
        heads = ("name", "kind", "in", "out", *(() if one_wdtype else ("weight",)), "scale",
                 "w scale", "qconfig", "notes")
        cells = [[r.name, r.kind, r.dtype_in, r.dtype_out,
                  *(() if one_wdtype else (r.weight_dtype,)),
                  f"{r.scale:.4g}" if r.scale is not None else "", wscale(r), r.qconfig,
                  notes(r)] for r in self]
        title = (f"qatkit summary: stage {self.stage}, march {self.march}"
                 + (f", weights {wdtypes[0]}" if len(wdtypes) == 1 else ""))
        return render(heads, cells, width, title=title, gap=1)

    def __str__(self) -> str:
        return self.table()


def _scale(fq: FakeQuantize | None) -> float | None:
    if fq is None or fq.is_float16 or not bool(fq.initialized) or fq.scale.numel() != 1:
        return None
    return float(fq.scale)


def _wrange(s: torch.Tensor | None) -> tuple[float, float] | None:
    if s is None or s.numel() == 0:
        return None
    return float(s.min()), float(s.max())


def _prepared_row(name: str, mod: nn.Module) -> Row | None:
    if isinstance(mod, QuantStub) and isinstance(mod.activation_post_process, FakeQuantize):
        fq = mod.activation_post_process
        return Row(name, "quant_stub", "float32", fq.dtype, scale=_scale(fq))
    if isinstance(mod, FloatFunctional) and isinstance(mod.activation_post_process,
                                                       FakeQuantize):
        fq = mod.activation_post_process
        return Row(name, "functional", dtype_out=fq.dtype, scale=_scale(fq))
    if isinstance(mod, DeQuantStub):
        return Row(name, "dequant_stub", dtype_out="float32")
    if isinstance(mod, _QATWeighted):
        app = mod.activation_post_process
        wfq = mod.weight_fake_quant
        w = mod._weight_oc_first() if hasattr(mod, "_weight_oc_first") else mod.weight
        ws = wfq.weight_scale(w)
        out = app.dtype if app is not None else "qint32"
        return Row(name, kind_of(mod) or type(mod).__name__, dtype_out=out,
                   weight_dtype=wfq.dtype, scale=_scale(app), weight_scale=_wrange(ws),
                   high_precision=mod.output_mode == "high_precision")
    if isinstance(mod, QATOp):
        fq = mod.activation_post_process
        return Row(name, kind_of(mod) or type(mod.op).__name__, dtype_out=fq.dtype,
                   scale=_scale(fq))
    return None


def _converted_row(name: str, mod: nn.Module) -> Row | None:
    if isinstance(mod, fx.QQuantStub):
        return Row(name, "quant_stub", "float32", mod.out_dtype, scale=float(mod.out_scale))
    if isinstance(mod, fx.QDeQuantStub):
        return Row(name, "dequant_stub", dtype_out="float32")
    if isinstance(mod, fx._QWeighted):
        return Row(name, type(mod).__name__.removeprefix("Q").lower().replace(
            "convtranspose2d", "conv_transpose2d"), dtype_out=mod.out_dtype,
            weight_dtype=str(mod.weight.dtype).removeprefix("torch.").replace("int", "qint"),
            scale=float(mod.out_scale) if mod.out_scale is not None else None,
            weight_scale=_wrange(mod.weight_scale),
            high_precision=mod.output_mode == "high_precision")
    if isinstance(mod, fx.QModule):
        kind = getattr(mod, "kind", None) or _FIXED_KINDS.get(type(mod).__name__,
                                                              type(mod).__name__)
        return Row(name, kind, dtype_out=mod.out_dtype,
                   scale=float(mod.out_scale) if mod.out_scale is not None else None)
    return None


# fixed-point module -> registry kind, where the module does not record it
_FIXED_KINDS = {"QFunctional": "functional", "QFloat16Functional": "functional",
                "QFloat16QuantStub": "quant_stub", "QAvgPool2d": "avg_pool2d", "QClamp": "clamp",
                "QUpsampleBilinear": "upsample_bilinear"}


def _args(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) \
        else (example_inputs,)


def _flow_prepared(model: nn.Module, rows: dict[str, Row], example_inputs: Any) -> None:
    """dtype_in (and FloatFunctional kinds) from one traced forward."""
    g = tr.trace(model, example_inputs)
    out: dict[int, str] = {}
    for n in g.nodes:
        ins = [out.get(i, "float32") for i in n.inputs if i >= 0]
        row = rows.get(n.target) if n.kind in ("module", "functional") else None
        if row is not None:
            if n.kind == "functional":
                row.kind = n.op
            row.dtype_in = ", ".join(dict.fromkeys(ins)) if ins else "float32"
            out[n.index] = row.dtype_out or (ins[0] if ins else "float32")
        else:  # ReLU, pooling, reshapes (and float ops): the input's dtype carries
            out[n.index] = ins[0] if ins else "float32"


def _flow_converted(model: nn.Module, rows: dict[str, Row], example_inputs: Any) -> None:
    handles = []
    names = {id(m): n for n, m in model.named_modules()}

    def pre(mod: nn.Module, args: tuple) -> None:
        row = rows.get(names.get(id(mod), ""))
        if row is None:
            return
        ins = []
        for a in args:
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, QTensor):
                    ins.append(t.dtype)
                elif isinstance(t, torch.Tensor):
                    ins.append(str(t.dtype).removeprefix("torch."))
        row.dtype_in = ", ".join(dict.fromkeys(ins))

    for n, m in model.named_modules():
        if n in rows:
            handles.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(*_args(example_inputs))
    finally:
        for h in handles:
            h.remove()


def summary(model: nn.Module, example_inputs: Any = None) -> Summary:
    """One :class:`Row` per quantized op of a prepared or converted ``model``."""
    from qatkit.base.errors import fail
    model = unwrap(model)
    facts = meta.get(model)
    if facts is None:
        raise fail("QK000", "summary needs a prepared or converted model (this one has no "
                   "qatkit metadata).", "qk.prepare(model, example_inputs, qconfig=...) first")
    converted = facts.stage == "converted"
    rows: dict[str, Row] = {}
    for name, mod in model.named_modules():
        r = _converted_row(name, mod) if converted else _prepared_row(name, mod)
        if r is not None:
            rows[name] = r
    sources = facts.recipe.get("sources", {})
    missing = unsupported_ops(resolve(facts.march))
    for name, r in rows.items():
        r.qconfig = sources.get(name, "")
        r.march = "no" if r.kind in missing else "yes"
    if example_inputs is not None:
        (_flow_converted if converted else _flow_prepared)(model, rows, example_inputs)
        for r in rows.values():
            r.march = "no" if r.kind in missing else "yes"
    out = Summary(rows.values())
    out.march, out.stage = facts.march, facts.stage
    return out
