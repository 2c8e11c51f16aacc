"""The accuracy report: one self-contained HTML page (plus the same data as JSON).

``write_report("report.html", float_model, quantized_model, example_inputs, (x, y))`` runs
everything that explains where accuracy goes and writes ``report.html`` and ``report.json``:

* the doctor's findings and the march's capabilities;
* per-layer comparisons (:mod:`qatkit.analysis.compare`): float vs fake quant, fake quant vs fixed
  point, float vs fixed point;
* per-layer statistics (:mod:`qatkit.analysis.stats`), sensitivity and the int16 suggestion, applied
  and measured (:mod:`qatkit.analysis.sensitivity`), the judged cause of each degraded layer
  (:mod:`qatkit.analysis.causes`) and, when given, the per-epoch QAT-vs-fixed-point history of a
  ``qk.FixedPointMonitor``;
* plots as inline SVG (:mod:`qatkit.analysis.plots`): SQNR and cosine along depth, error histograms,
  the sensitivity ranking.

The page needs no network: CSS, the table-sorting script and the plots are inline, and the
report's data is embedded as JSON (``<script id="qatkit-report-data">``). Tables and plots are
rendered from the very dict written to the JSON file, so their numbers are the JSON's.

Command line (``qatkit report``, see ``docs/report.md``)::

    qatkit report --demo [--dataset digits] [--damage LAYER] --output report.html
    qatkit report FILE.py:FUNC --output report.html
"""

from __future__ import annotations

import datetime
import json
import os
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from qatkit.analysis.compare import Comparison, _num, _sig, compare, evaluation, stage
from qatkit.analysis.sensitivity import (
    Metric,
    _outputs,
    accuracy,
    float_copy,
    sensitivity,
    targets,
)
from qatkit.analysis.sensitivity_qconfig import sensitivity_qconfig, try_sensitivity_qconfig
from qatkit.base import files
from qatkit.base.errors import QatkitError, QatkitWarning, fail, strict
from qatkit.base.march import March, get_march, resolve, set_march
from qatkit.quantization.registry import unsupported_ops

HISTOGRAMS = 6  # error histograms shown: the layers with the largest own error


# ------------------------------------------------------------------------------ helpers
def damage(model: nn.Module, layer: str, factor: float = 100.0) -> nn.Module:
    """Multiply the output scale of ``layer`` in a prepared model by ``factor`` (in place),
    as a deliberately bad scale for trying the report: ``factor > 1`` wastes levels,
    ``factor < 1`` clips. ``convert`` keeps the damaged scale."""
    from qatkit.quantization.fake_quant import FakeQuantize
    try:
        mod = model.get_submodule(layer)
    except AttributeError:
        raise fail("QK000", f"no module named {layer!r} to damage.",
                   "name a layer with an output fake quant, e.g. conv2") from None
    fq = getattr(mod, "activation_post_process", None)
    if not isinstance(fq, FakeQuantize) or not bool(fq.initialized):
        raise fail("QK000", f"{layer!r} has no calibrated output fake quant to damage.",
                   "name a calibrated layer with a quantized output (conv, add, pooling...)")
    if not factor > 0:
        raise fail("QK000", f"the damage factor must be positive, got {factor}.")
    if fq.scale_pending:  # an open calibration would recompute the scale at convert
        fq.update_scale()
    with torch.no_grad():
        fq.scale.mul_(factor)
    return model


def _split_data(data: Any, example_inputs: Any) -> tuple[Any, torch.Tensor | None]:
    if data is None:
        return example_inputs, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(
            data[1], torch.Tensor) and not data[1].is_floating_point() and data[1].dim() == 1:
        return data[0], data[1]
    if isinstance(data, torch.Tensor):
        return data, None
    raise fail("QK000", "data must be (x, y) with integer labels y, or an input tensor x.",
               "e.g. write_report(path, float_model, quant_model, x[:2], (x_test, y_test))")


def _head(x: Any, n: int) -> Any:
    return x[:n] if isinstance(x, torch.Tensor) else x


def _batches(x: Any, size: int) -> list[Any]:
    if isinstance(x, torch.Tensor):
        return [x[i:i + size] for i in range(0, len(x), size)]
    return [x]


def _fit_samples(model: nn.Module, x: Any, samples: int, budget: int = 1 << 30) -> int:
    """At most ``samples`` such that a comparison's recorded activations (both sides, with
    float64 working copies) stay within ``budget`` bytes, measured on one sample."""
    from qatkit.analysis.compare import leaves, record
    from qatkit.base.qtensor import QTensor
    if not isinstance(x, torch.Tensor) or len(x) <= 1:
        return samples
    calls, _ = record(model, x[:1])
    per = sum((t.q if isinstance(t, QTensor) else t).numel() * 8
              for c in calls for t in leaves((c.args, c.kwargs, c.output)))
    return max(1, min(samples, budget // max(1, 4 * per)))


def _quiet() -> Any:
    """Workflow warnings (QK104, QK105... at convert) belong to the doctor section; strict
    mode must not stop a diagnostic report either."""
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(strict(False))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", QatkitWarning)
    return stack


def _march_dict(m: March | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {"name": m.name, "processors": list(m.processors),
            "activation_dtypes": list(m.activation_dtypes),
            "weight_dtypes": list(m.weight_dtypes),
            "high_precision_output": m.high_precision_output, "pow2_scales": m.pow2_scales,
            "max_rank": m.max_rank, "unsupported_ops": sorted(unsupported_ops(m)),
            "notes": m.notes}


def _monitor_unit(monitor: Any) -> str:
    from qatkit.quantization.evaluate import accuracy as monitor_accuracy
    return "%" if getattr(monitor, "metric", None) is monitor_accuracy else ""


def _monitor_rows(monitor: Any) -> list[dict[str, Any]] | None:
    """The monitor's history; accuracy (its default metric) in percent, unrounded."""
    if monitor is None:
        return None
    k = 100.0 if _monitor_unit(monitor) == "%" else 1.0
    history = getattr(monitor, "history", monitor)
    rows = []
    for i, r in enumerate(history):
        fqv = getattr(r, "fake_quant", None)
        fxv = getattr(r, "fixed_point", None)
        if fqv is None and isinstance(r, dict):
            fqv, fxv = r.get("fake_quant"), r.get("fixed_point")
        fqv = None if fqv is None else float(fqv) * k
        fxv = None if fxv is None else float(fxv) * k
        rows.append({"step": int(getattr(r, "step", i)), "fake_quant": fqv,
                     "fixed_point": fxv,
                     "gap": fqv - fxv if fqv is not None and fxv is not None else None})
    return rows


# ------------------------------------------------------------------------------ building
def build(model_float: nn.Module, model_quant: nn.Module, example_inputs: Any,
          data: Any = None, march: str | March | None = None, *, metric: Metric | None = None,
          metric_name: str | None = None, budget: int = 2,
          calibration: Iterable[Any] | None = None, monitor: Any = None, samples: int = 256,
          title: str | None = None, batch_size: int = 512, min_sqnr_db: float = 30.0,
          min_drop: float = 0.01, quant_label: str | None = None,
          reference: str = "same-weights") -> dict[str, Any]:
    """Everything the report shows, as one JSON-ready dict (see :func:`write_report`)."""
    if reference not in ("same-weights", "float"):
        raise fail("QK000", f"reference must be 'same-weights' or 'float', got {reference!r}.")
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    notes: list[str] = []
    if not isinstance(model_float, nn.Module) or not isinstance(model_quant, nn.Module):
        raise fail("QK000", "write_report needs the float model and the quantized model "
                   "(prepared/QAT or converted) as nn.Modules.")
    if stage(model_float) != "float":
        raise fail("QK000", "the first model must be the float model (not prepared).",
                   "write_report(path, float_model, quantized_model, example_inputs, data)")
    st = stage(model_quant)
    if st == "float":
        raise fail("QK000", "the second model is a float model: pass the calibrated/QAT model "
                   "(or its converted fixed-point model).",
                   "qk.prepare(...) and calibrate, then write_report(..., model_quant=qat)")
    from qatkit.quantization import meta
    recorded = meta.get(model_quant)
    the_march = resolve(march) if march is not None else (
        get_march() or (resolve(recorded.march) if recorded is not None else None))
    if the_march is None:
        raise fail("QK002", "no march: the report needs the target's capabilities.",
                   "pass march='nash-e' (or set qk.set_march)")
    x, y = _split_data(data, example_inputs)
    with set_march(the_march):
        prepared = model_quant if st != "converted" else None
        t = time.perf_counter()
        with _quiet():
            from qatkit.quantization.convert import convert
            fixed = convert(prepared) if prepared is not None else model_quant
        timing["convert"] = time.perf_counter() - t

        # metric of every stage on the same samples
        t = time.perf_counter()
        with evaluation(model_float):
            ref = _outputs(model_float, x, batch_size)
        target, fn, name = targets(ref, y, metric, metric_name)
        # One unit for accuracy everywhere in the report: percent, unrounded in the JSON
        # (the page rounds for display); a user's metric keeps its own unit.
        k = 100.0 if fn is accuracy else 1.0
        unit = "%" if fn is accuracy else ""
        metrics: dict[str, Any] = {"name": name, "unit": unit, "samples": len(ref),
                                   "float": float(fn(ref, target)) * k,
                                   "float_same_weights": None, "fake_quant": None,
                                   "fixed_point": None}
        twin = float_copy(prepared) if prepared is not None else None
        if prepared is not None and twin is not None:
            with evaluation(prepared):
                metrics["fake_quant"] = float(fn(_outputs(prepared, x, batch_size), target)) * k
            with evaluation(twin):
                metrics["float_same_weights"] = float(
                    fn(_outputs(twin, x, batch_size), target)) * k
        with evaluation(fixed):
            metrics["fixed_point"] = float(fn(_outputs(fixed, x, batch_size), target)) * k
        timing["metrics"] = time.perf_counter() - t

        t = time.perf_counter()
        n = _fit_samples(fixed, x, samples)
        if n < min(samples, len(x) if isinstance(x, torch.Tensor) else n):
            notes.append(f"the per-layer comparisons use {n} samples (not {samples}) to keep "
                         "the recorded activations within 1 GiB")
        batch = _head(x, n)
        comparisons: list[Comparison] = []
        fq_name = quant_label or "fake quant"
        # Per-layer errors against the float model with the very weights being quantized:
        # after QAT the original float weights differ, and that drift is no quantization error.
        ref_model, ref_name = model_float, "float"
        if twin is not None and reference == "same-weights":
            ref_model, ref_name = twin, "float (same weights)"
            notes.append("per-layer comparisons use the prepared model with every fake quant "
                         "passing values through as the float side (same fused weights), so "
                         "that weight changes made by QAT do not count as quantization error")
        if prepared is not None:
            comparisons.append(compare(ref_model, prepared, batch, names=(ref_name, fq_name)))
            comparisons.append(compare(prepared, fixed, batch, names=(fq_name, "fixed point")))
        comparisons.append(compare(ref_model, fixed, batch, names=(ref_name, "fixed point")))
        main = comparisons[-1]
        timing["compare"] = time.perf_counter() - t

        t = time.perf_counter()
        from qatkit.analysis.stats import layer_stats
        stats = layer_stats(prepared if prepared is not None else fixed,
                            _batches(x, batch_size))
        timing["stats"] = time.perf_counter() - t

        sens, sens_skipped = None, ""
        t = time.perf_counter()
        if prepared is not None:
            sens = sensitivity(prepared, x, y, metric, metric_name=name, march=the_march,
                               budget=budget, batch_size=batch_size, min_drop=min_drop,
                               max_output_sqnr_db=min_sqnr_db)
            if budget > 0:  # int16 outputs and weights of the sensitive layers, logged
                plan = sensitivity_qconfig(sens, prepared, budget=budget, march=the_march,
                                           min_drop=min_drop, max_output_sqnr_db=min_sqnr_db)
                sens.changes = [c.to_dict() for c in plan.changes]
                sens.suggestion = plan.changed_layers
            if sens.suggestion:
                try:
                    with _quiet():
                        sens.applied = try_sensitivity_qconfig(
                            model_float, prepared, plan, example_inputs,
                            calibration if calibration is not None else _batches(
                                x, batch_size), x, y, metric, batch_size)
                except QatkitError as e:
                    sens.notes.append(f"the int16 suggestion could not be applied: {e}")
        else:
            sens_skipped = ("the quantized model is converted (fixed point); pass the "
                            "calibrated or QAT model to rank layers by sensitivity")
        timing["sensitivity"] = time.perf_counter() - t

        views = _views(model_float, prepared, fixed, twin, example_inputs, x, y, batch,
                       metric, name, batch_size, min_drop, k, timing)

        t = time.perf_counter()
        doctor_report: Any = None
        try:
            from qatkit import doctor
            with _quiet():
                doctor_report = doctor.check(model_quant, example_inputs, march=the_march)
            doctor_dict = doctor_report.to_dict()
        except Exception as e:  # the report must still show everything else
            doctor_dict = {"error": f"{type(e).__name__}: {e}", "findings": []}
        timing["doctor"] = time.perf_counter() - t

        from qatkit.analysis.causes import judge
        judgements = judge(main, stats, sens, doctor_report, the_march,
                           min_sqnr_db=min_sqnr_db, min_drop=min_drop, percent=k == 100.0)

    ranked = [lc for lc in main.ranking() if lc.own_sqnr_db is not None]
    summary = {"worst_layer": ranked[0].name if ranked else None,
               "worst_own_sqnr_db": _num(ranked[0].own_sqnr_db, 2) if ranked else None,
               "worst_in": f"{main.b} vs {main.a}",
               "most_sensitive": sens.layers[0].name if sens and sens.layers else None,
               "causes": {j.layer: j.cause.kind for j in judgements if j.cause}}
    from qatkit.base import VERSION as __version__
    timing = {k: round(v, 3) for k, v in timing.items()}
    timing["total"] = round(time.perf_counter() - t_start, 3)
    return {
        "title": title or f"qatkit report: {type(model_float).__name__} on {the_march.name}",
        "qatkit": __version__, "torch": torch.__version__,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": {"name": type(model_float).__name__,
                  "stage": "fixed point" if st == "converted" else (quant_label or st)},
        "march": _march_dict(the_march), "metrics": metrics, "summary": summary,
        "thresholds": {"min_sqnr_db": min_sqnr_db, "min_drop": min_drop * k},
        "doctor": doctor_dict, "comparisons": [_scaled_comparison(c, k) for c in comparisons],
        "stats": stats.to_dict(), "sensitivity": _scaled_sensitivity(sens, k),
        "sensitivity_skipped": sens_skipped,
        "causes": [_scaled_judgement(j, k) for j in judgements],
        "degraded": [j.layer for j in judgements],
        "monitor": _monitor_rows(monitor), "monitor_unit": _monitor_unit(monitor), **views,
        "timing": timing, "notes": notes,
    }


def _views(model_float: nn.Module, prepared: nn.Module | None, fixed: nn.Module,
           twin: nn.Module | None, example_inputs: Any, x: Any, y: torch.Tensor | None,
           batch: Any, metric: Metric | None, metric_name: str, batch_size: int,
           min_drop: float, k: float, timing: dict[str, float]) -> dict[str, Any]:
    """The views of AIMET's QuantAnalyzer and the vendors' profilers, one module each:
    weight-only vs activation-only quantization, "all but this layer" with the float-fallback
    bisection, per-channel weight ranges, value histograms, the per-layer summary and float
    vs QAT weights. Metric values times ``k`` (percent for accuracy)."""
    from qatkit.analysis.compare import align_float
    from qatkit.analysis.histograms import value_histograms
    from qatkit.analysis.keep_float import all_but_one
    from qatkit.analysis.summary import summary
    from qatkit.analysis.weight_drift import weight_drift
    from qatkit.analysis.weight_ranges import weight_ranges
    from qatkit.analysis.weights_activations import weights_vs_activations
    out: dict[str, Any] = {"weights_activations": None, "all_but_one": None,
                           "weight_drift": None}
    t = time.perf_counter()
    if prepared is not None:
        with _quiet():
            out["weights_activations"] = weights_vs_activations(
                prepared, x, y, metric, metric_name=metric_name,
                batch_size=batch_size).to_dict(k)
            out["all_but_one"] = all_but_one(
                prepared, x, y, metric, metric_name=metric_name, batch_size=batch_size,
                tolerance=min_drop).to_dict(k)
        out["weight_drift"] = [d.to_dict() for d in weight_drift(model_float, prepared,
                                                                 example_inputs)]
    timing["keep_float"] = time.perf_counter() - t
    t = time.perf_counter()
    out["weight_ranges"] = [r.to_dict() for r in weight_ranges(
        prepared if prepared is not None else fixed)]
    side = twin if twin is not None else align_float(model_float, fixed, example_inputs)
    with _quiet():
        out["histograms"] = [h.to_dict() for h in value_histograms(side, fixed, batch)]
    rows = summary(prepared if prepared is not None else fixed, example_inputs).to_dicts()
    for r in rows:  # (lo, hi) -> two columns; 6 significant digits, as the other tables
        lo_hi = r.pop("weight_scale")
        r["scale"] = _sig(r["scale"], 6)
        r["weight_scale_min"], r["weight_scale_max"] = (
            (_sig(lo_hi[0], 6), _sig(lo_hi[1], 6)) if lo_hi else (None, None))
    out["quant_summary"] = rows
    timing["views"] = time.perf_counter() - t
    return out


def _scaled_comparison(c: Comparison, k: float) -> dict[str, Any]:
    d = c.to_dict()
    if k != 1.0 and d["output"].get("top1_agreement") is not None:
        d["output"]["top1_agreement"] = d["output"]["top1_agreement"] * k
    return d


def _scaled_sensitivity(sens: Any, k: float) -> dict[str, Any] | None:
    """``Sensitivity.to_dict`` with its metric values exact, times ``k``."""
    if sens is None:
        return None
    d = sens.to_dict()
    d["reference"], d["quantized"] = sens.reference * k, sens.quantized * k
    for row, layer in zip(d["layers"], sens.layers):
        row["metric"], row["drop"] = layer.metric * k, layer.drop * k
    a = d.get("applied")
    if a:
        for key in ("float", "before", "after", "gain"):
            if a.get(key) is not None:
                a[key] = a[key] * k
    return d


def _scaled_judgement(j: Any, k: float) -> dict[str, Any]:
    d = j.to_dict()
    if j.drop is not None:
        d["drop"] = j.drop * k
    return d


# ------------------------------------------------------------------------------ rendering
def _plots(r: dict[str, Any]) -> dict[str, list[str]]:
    from qatkit.analysis import plots
    out: dict[str, list[str]] = {"depth": [], "histograms": [], "sensitivity": [],
                                 "monitor": [], "weights_activations": [], "keep_float": [],
                                 "weight_ranges": [], "histograms_values": [],
                                 "weight_drift": []}
    unit = " (%)" if r["metrics"].get("unit") == "%" else ""
    points = " (points)" if unit else ""
    comps = r["comparisons"]
    if comps:
        main = comps[-1]
        names = [lc["name"] for lc in main["layers"]]

        def along(c: dict[str, Any], key: str) -> list[float | None]:
            by = {lc["name"]: lc[key] for lc in c["layers"]}
            return [by.get(n) for n in names]

        sq = [{"name": f"{c['b']} vs {c['a']}", "values": along(c, "sqnr_db")} for c in comps]
        sq.append({"name": f"own: {main['b']} vs {main['a']}",
                   "values": along(main, "own_sqnr_db"), "dashed": True})
        out["depth"].append(plots.line_chart(
            names, sq, title="SQNR along depth (higher is better; own = error the layer adds)",
            y_label="SQNR (dB)", kind="sqnr-depth"))
        cos = [{"name": f"{c['b']} vs {c['a']}", "values": along(c, "cosine")} for c in comps]
        out["depth"].append(plots.line_chart(
            names, cos, title="cosine similarity along depth", y_label="cosine",
            kind="cosine-depth"))
        worst = [n for n in main["ranking"]][:HISTOGRAMS]
        by = {lc["name"]: lc for lc in main["layers"]}
        for n in worst:
            h = by[n]["error_hist"]
            if h.get("counts"):
                out["histograms"].append(plots.histogram(
                    h["edges"], h["counts"], title=f"{n} ({by[n]['op']})", unit=h["unit"],
                    kind="error-histogram"))
    s = r.get("sensitivity")
    if s and s["layers"]:
        labels = [x["name"] for x in s["layers"]]
        hi = set(s["suggestion"])
        out["sensitivity"].append(plots.bar_chart(
            labels, [x["drop"] for x in s["layers"]],
            title=f"{s['metric']} drop with only this layer quantized (red: int16 suggestion)",
            x_label=f"drop in {s['metric']}", kind="sensitivity-drop", highlight=hi))
        out["sensitivity"].append(plots.bar_chart(
            labels, [x["output_sqnr_db"] for x in s["layers"]],
            title="model output SQNR with only this layer quantized (lower = more sensitive)",
            x_label="SQNR (dB)", kind="sensitivity-sqnr", highlight=hi))
    m = r.get("monitor")
    if m:
        steps = [str(x["step"]) for x in m]
        out["monitor"].append(plots.line_chart(
            steps, [{"name": "fake quant", "values": [x["fake_quant"] for x in m]},
                    {"name": "fixed point", "values": [x["fixed_point"] for x in m]}],
            title="QAT: fake-quant vs fixed-point metric per epoch",
            y_label="accuracy (%)" if r.get("monitor_unit") == "%" else "metric",
            kind="monitor"))
    w = r.get("weights_activations")
    if w:
        out["weights_activations"].append(plots.bar_chart(
            [x["quantized"] for x in w["rows"]], [x["metric"] for x in w["rows"]],
            title=f"{w['metric']} by what is quantized", x_label=f"{w['metric']}{unit}",
            kind="weights-activations"))
    a = r.get("all_but_one")
    if a and a["layers"]:
        out["keep_float"].append(plots.bar_chart(
            [x["name"] for x in a["layers"]], [x["recovery"] for x in a["layers"]],
            title=f"{a['metric']} recovered by keeping only this layer in float "
                  "(red: the bisection's fallback)",
            x_label=f"recovery{points}", kind="keep-float-recovery",
            highlight=set(a["fallback"] or ())))
    for wr in r.get("weight_ranges") or []:
        out["weight_ranges"].append(plots.range_chart(
            wr["ch_min"], wr["ch_max"], title=f"{wr['name']} ({wr['op']}, {wr['channels']} ch)",
            kind="weight-ranges"))
    for h in r.get("histograms") or []:
        out["histograms_values"].append(plots.overlay_histogram(
            h["edges"], h["float"], h["quantized"], title=f"{h['name']} ({h['op']})",
            names=("float", "fixed point")))
    d = r.get("weight_drift")
    if d:
        out["weight_drift"].append(plots.bar_chart(
            [x["name"] for x in d], [x["levels_changed"] for x in d],
            title="share of integer weights that differ from the float weights'",
            x_label="levels changed", kind="weight-drift"))
    return out


def _num_filter(v: Any) -> str:
    if v is None:
        return "\u2013"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _pct_filter(v: Any) -> str:
    """A percentage (or points) for display: two decimals; the JSON keeps it exact."""
    if v is None:
        return "\u2013"
    return f"{v:.2f}"


def _metric_filter(v: Any, unit: str) -> str:
    return _num_filter(v) if unit != "%" or v is None else f"{_pct_filter(v)} %"


def _diff_filter(v: Any, unit: str) -> str:
    return _num_filter(v) if unit != "%" or v is None else f"{_pct_filter(v)} points"


def render_html(r: dict[str, Any]) -> str:
    """The HTML page of a :func:`build` dict (self-contained)."""
    import jinja2
    from markupsafe import Markup
    env = jinja2.Environment(loader=jinja2.PackageLoader("qatkit.analysis", "templates"),
                             autoescape=True, undefined=jinja2.ChainableUndefined)
    env.filters["num"] = _num_filter
    env.filters["pct"] = _pct_filter
    env.filters["m"] = _metric_filter
    env.filters["d"] = _diff_filter
    plots = {k: [Markup(p) for p in v] for k, v in _plots(r).items()}
    # "</" inside a <script> would end it; "<\/" is the same JSON string.
    text = json.dumps(r, allow_nan=False).replace("</", "<\\/")
    return env.get_template("report.html.j2").render(r=r, plots=plots,
                                                     json_text=Markup(text),
                                                     rules_base=_rules_base())


def _rules_base() -> str:
    """Where the rule pages (docs/rules/QKnnn.md) are: the checkout's, as a file URI, when
    qatkit runs from one; else the path inside the repository."""
    from pathlib import Path
    docs = Path(__file__).resolve().parents[2] / "docs" / "rules"
    return docs.as_uri() + "/" if docs.is_dir() else "docs/rules/"


def write_report(path: str | os.PathLike, model_float: nn.Module, model_quant: nn.Module,
                 example_inputs: Any, data: Any = None, march: str | March | None = None,
                 **options: Any) -> dict[str, Any]:
    """Write the HTML report to ``path`` and its data to the same name with ``.json``;
    return that data.

    ``model_float``: the float model; ``model_quant``: the calibrated/QAT model (everything)
    or its converted fixed-point model (no sensitivity); ``example_inputs`` as for prepare;
    ``data``: ``(x, y)`` labelled samples (or ``x`` alone: the metric becomes top-1 agreement
    with the float model). Options (see :func:`build`): ``metric(output, target)``,
    ``metric_name``, ``budget`` (int16 layers to suggest, default 2), ``calibration``
    (batches to calibrate int16 outputs; default ``x``), ``monitor`` (a FixedPointMonitor),
    ``samples`` (per-layer comparison batch, default 256), ``title``, ``min_sqnr_db``,
    ``min_drop``."""
    path = os.fspath(path)
    json_path = os.path.splitext(path)[0] + ".json"
    if os.path.abspath(json_path) == os.path.abspath(path):
        raise fail("QK000", f"the report path {path!r} would be overwritten by its JSON.",
                   "name the report something.html")
    for p in (path, json_path):  # before the long build, not after it
        files.check_output(p)
    r = build(model_float, model_quant, example_inputs, data, march, **options)
    r["files"] = {"html": os.path.basename(path), "json": os.path.basename(json_path)}
    page = render_html(r)
    text = json.dumps(r, indent=1, allow_nan=False) + "\n"
    files.write_text(json_path, text)  # each atomic: old or new, never half a file
    files.write_text(path, page)
    return r


__all__ = ["build", "damage", "render_html", "write_report"]
