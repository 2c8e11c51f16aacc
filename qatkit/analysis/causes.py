"""Cause judgement: for each degraded layer, the likely cause, the evidence, the rule and fix.

A layer counts as *degraded* when the error it adds on its own is large (own-error SQNR of
:func:`qatkit.analysis.compare.compare` below ``min_sqnr_db``) or quantizing it alone visibly hurts
the model (:func:`qatkit.analysis.sensitivity.sensitivity`: output SQNR below ``min_sqnr_db`` or a
metric drop of at least ``min_drop``). Its causes are then judged from the evidence, most specific
first:

==================  ===========================================================  ======
cause               evidence                                                     rule
==================  ===========================================================  ======
non-finite values   NaN/Inf reach the layer (stats)                              QK103
bad scale           the data needs under 1/8 of the int range (``range_use``)    QK105
clipping            over 1% of values beyond the quantization bounds             QK105
outliers            max|x| over 4x the 99.9th percentile (a long tail sets it)   QK105
unbalanced inputs   add/cat input scales differ beyond QK104's limits            QK104
low-precision out   a GEMM feeding only DeQuantStubs is rounded (doctor)         QK003
shared module       one module called at several places                          QK007
unfused pattern     conv/bn/relu left unfused (doctor)                           QK100
doctor finding      any other doctor finding on the same module                  its own
int8 resolution     none of the above: plain rounding noise of int8              --
==================  ===========================================================  ======
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qatkit.analysis.compare import Comparison, _num
from qatkit.analysis.sensitivity import Sensitivity
from qatkit.analysis.stats import Stats
from qatkit.base.march import March, resolve
from qatkit.doctor.rules.qk105_range import RANGE_USE as BAD_SCALE_RANGE_USE

OUTLIER_TAIL_RATIO = 4.0


def _clip_fraction() -> float:
    from qatkit.doctor.rules.qk105_range import CLIP_FRACTION
    return CLIP_FRACTION


def _limits() -> dict[str, float]:
    from qatkit.doctor.rules.qk104_scale_imbalance import ADD_LIKE_RATIO, CAT_LIKE_RATIO
    return {**dict.fromkeys(("add", "add_relu", "sub"), ADD_LIKE_RATIO),
            **dict.fromkeys(("cat", "concat", "stack", "maximum", "minimum"), CAT_LIKE_RATIO)}


@dataclass
class Cause:
    kind: str  # "nonfinite", "bad-scale", "clipping", "outliers", "unbalanced-inputs", ...
    title: str
    evidence: str
    code: str | None  # the doctor rule this cause belongs to
    rule: str | None  # that rule's name
    fix: str


@dataclass
class Judgement:
    """One degraded layer: why it counts as degraded, and its causes (likeliest first)."""

    layer: str
    module: str
    reasons: list[str]
    own_sqnr_db: float | None
    drop: float | None
    output_sqnr_db: float | None
    causes: list[Cause] = field(default_factory=list)

    @property
    def cause(self) -> Cause | None:
        return self.causes[0] if self.causes else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["own_sqnr_db"] = _num(self.own_sqnr_db, 2)
        d["drop"] = _num(self.drop, 6)
        d["output_sqnr_db"] = _num(self.output_sqnr_db, 2)
        return d


def _rule_name(code: str | None) -> str | None:
    if code is None:
        return None
    from qatkit.doctor.rules import all_rules
    r = all_rules().get(code)
    return r.name if r is not None else None


def _cause(kind: str, title: str, evidence: str, code: str | None, fix: str) -> Cause:
    return Cause(kind, title, evidence, code, _rule_name(code), fix)


def _findings(doctor: Any) -> list[dict[str, Any]]:
    """Doctor findings as dicts, from a ``doctor.Report``, its ``to_dict()`` or a list."""
    if doctor is None:
        return []
    if hasattr(doctor, "to_dict"):
        doctor = doctor.to_dict()
    if isinstance(doctor, dict):
        doctor = doctor.get("findings", [])
    return [f.to_dict() if hasattr(f, "to_dict") else dict(f) for f in doctor]


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _int16_hint(march: March | None) -> str:
    if march is not None and "qint16" in march.activation_dtypes:
        return f"; or give this op an int16 output (allowed on {march.name})"
    return ""


def judge(comparison: Comparison | None = None, stats: Stats | None = None,
          sensitivity: Sensitivity | None = None, doctor: Any = None,
          march: str | March | None = None, *, min_sqnr_db: float = 30.0,
          min_drop: float = 0.01, percent: bool = False) -> list[Judgement]:
    """Judge the cause of every degraded layer from the evidence given (any may be None):
    a :class:`~qatkit.analysis.compare.Comparison` (float or QAT vs fixed point is the most
    telling), :class:`~qatkit.analysis.stats.Stats` of the prepared or fixed-point model, a
    :class:`~qatkit.analysis.sensitivity.Sensitivity` and the doctor's report. Returns the degraded
    layers, most damaging first. ``percent``: the metric is a fraction (accuracy) that the
    reasons write in percentage points."""
    the_march = resolve(march) if march is not None else None
    findings = _findings(doctor)
    degraded: dict[str, Judgement] = {}
    order: dict[str, tuple[float, float]] = {}

    def entry(label: str, module: str) -> Judgement:
        if label not in degraded:
            degraded[label] = Judgement(label, module, [], None, None, None)
        return degraded[label]

    if comparison is not None:
        for lc in comparison.layers:
            if lc.own_sqnr_db is not None and lc.own_sqnr_db < min_sqnr_db:
                j = entry(lc.name, lc.module)
                j.own_sqnr_db = lc.own_sqnr_db
                j.reasons.append(f"adds error on its own: own-error SQNR {lc.own_sqnr_db:.1f} dB "
                                 f"(< {min_sqnr_db:g} dB) in {comparison.b} vs "
                                 f"{comparison.a}")
                order[lc.name] = (lc.own_sqnr_db, 0.0)
    if sensitivity is not None:
        for r in sensitivity.layers:
            bad_out = r.output_sqnr_db < min_sqnr_db
            if not (bad_out or r.drop >= min_drop):
                continue
            j = entry(r.name, r.name)
            j.drop, j.output_sqnr_db = r.drop, r.output_sqnr_db
            moved = f"{-r.drop * 100:+.2f} points" if percent else f"{-r.drop:+.4g}"
            j.reasons.append(
                f"quantized alone, it moves {sensitivity.metric_name} by {moved} and the "
                f"model output to {r.output_sqnr_db:.1f} dB SQNR (sensitivity rank {r.rank})")
            prev = order.get(r.name, (float("inf"), 0.0))
            order[r.name] = (min(prev[0], r.output_sqnr_db), -r.drop)
    if comparison is not None:  # comparison labels carry call numbers; fill own SQNR
        for lc in comparison.layers:
            if lc.name in degraded and degraded[lc.name].own_sqnr_db is None:
                degraded[lc.name].own_sqnr_db = lc.own_sqnr_db
    for j in degraded.values():
        j.causes = _causes(j, comparison, stats, findings, the_march)
    return sorted(degraded.values(), key=lambda j: (order[j.layer][1], order[j.layer][0]))


def _causes(j: Judgement, comparison: Comparison | None, stats: Stats | None,
            findings: list[dict[str, Any]], march: March | None) -> list[Cause]:
    out: list[Cause] = []
    st = None
    if stats is not None:
        st = next((s for s in stats.layers if s.name == j.layer), None) or next(
            (s for s in stats.layers if s.module == j.module), None)
    lc = None
    if comparison is not None:
        lc = next((c for c in comparison.layers if c.name == j.layer), None)
    hint16 = _int16_hint(march)
    if st is not None and (st.nan or st.inf):
        out.append(_cause(
            "nonfinite", "non-finite values",
            f"{st.nan} NaN and {st.inf} Inf values reach '{j.layer}' on this data.", "QK103",
            "find the op that overflows or divides by zero in the float model (a log/sqrt of "
            "<= 0, an exploding activation) and fix it before quantizing"))
    if st is not None and st.range_use is not None and st.dtype is not None:
        from qatkit.base.quant_math import qrange
        qmax = qrange(st.dtype)[1]
        scale = st.scale if st.scale is not None else 0.0
        if st.range_use < BAD_SCALE_RANGE_USE and st.absmax > 0:
            need = st.absmax / qmax
            out.append(_cause(
                "bad-scale", "bad scale: far too large for the data",
                f"the output scale {_fmt(scale)} is {1 / st.range_use:.1f}x what the largest "
                f"value needs ({_fmt(need)} for max|x| = {_fmt(st.absmax)}): the data uses "
                f"{st.range_use * qmax:.0f} of {qmax} {st.dtype} levels, so typical values "
                f"(std {_fmt(st.std)}) are rounded to a handful of steps.", "QK105",
                "re-calibrate this op's output scale on representative data and check that no "
                "scale was set, scaled or loaded by hand (or from another model)" + hint16))
        if st.clipped is not None and st.clipped > _clip_fraction():
            out.append(_cause(
                "clipping", "clipping: the scale is too small for the data",
                f"{100 * st.clipped:.2f}% of the values of '{j.layer}' lie beyond the "
                f"{st.dtype} bounds (±{_fmt(qmax * scale)}); the largest is {_fmt(st.absmax)}, "
                f"{st.range_use:.1f}x the bound: they saturate.", "QK105",
                "re-calibrate with an observer that covers the data (minmax, or a higher "
                "percentile) and check the scale was not set by hand" + hint16))
    if st is not None and st.tail_ratio is not None and st.tail_ratio > OUTLIER_TAIL_RATIO \
            and not any(c.kind == "clipping" for c in out):
        out.append(_cause(
            "outliers", "outliers / long tail",
            f"max|x| = {_fmt(st.absmax)} is {st.tail_ratio:.1f}x the 99.9th percentile of |x| "
            f"({_fmt(st.p99_9)}): rare values set the range and the bulk uses few levels.",
            "QK105",
            "find what produces the rare large values (a missing BN or activation, an "
            "unnormalized input); a percentile/MSE observer clips them" + hint16))
    if lc is not None:
        limit = _limits().get(lc.op)
        scales = [s for s in lc.input_scales if s is not None and s > 0]
        if limit is not None and len(scales) >= 2 and max(scales) / min(scales) > limit:
            ratio = max(scales) / min(scales)
            out.append(_cause(
                "unbalanced-inputs", f"unbalanced {lc.op} inputs",
                f"the input scales of {lc.op} '{j.layer}' differ {ratio:.0f}x (limit "
                f"{limit:.0f}x): {', '.join(_fmt(s) for s in lc.input_scales if s)}; the "
                f"small input keeps about {256 / ratio:.1f} of its 256 levels.", "QK104",
                "bring the inputs to similar ranges (a BN or 1x1 conv on the small branch), "
                "or output them separately" + hint16))
    calls = None
    if comparison is not None:
        calls = sum(1 for c in comparison.layers if c.module == j.module)
    if (calls is not None and calls > 1) or "#" in j.layer:
        out.append(_cause(
            "shared-module", "shared module",
            f"'{j.module}' is called {calls or 'several'} times in one forward: one output "
            "scale serves every call site.", "QK007",
            "create one module (one FloatFunctional) per call site"))
    kinds = {"QK003": ("low-precision-output", "missing high-precision output"),
             "QK007": ("shared-module", "shared module"),
             "QK100": ("unfused", "unfused pattern"),
             "QK104": ("unbalanced-inputs", "unbalanced inputs"),
             "QK105": ("range", "range int8 holds badly"),
             "QK103": ("nonfinite", "non-finite values")}
    for f in findings:
        if f.get("module") != j.module:
            continue
        code = f.get("code")
        same = next((c for c in out if c.code == code), None)
        if same is not None:  # the doctor agrees: add its words as evidence
            if f.get("message") and f["message"] not in same.evidence:
                same.evidence += f" Doctor: {f['message']}"
            continue
        kind, title = kinds.get(code, ("doctor", f"doctor finding {code}"))
        out.append(_cause(kind, title, f.get("message", ""), code, f.get("fix", "")))
    if not out:
        out.append(_cause(
            "int8-resolution", "int8 resolution",
            f"no specific fault found in the evidence: '{j.layer}' loses precision to plain "
            "rounding of its weights and output.", None,
            "fine-tune with QAT" + (hint16 or "; a march with int16 activations would allow "
                                    "a 16-bit output")))
    return out


__all__ = ["Cause", "Judgement", "judge"]
