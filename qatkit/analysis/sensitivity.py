"""Per-layer sensitivity: how much the final output degrades when only one layer is quantized.

``sensitivity(model, x, y)`` takes a prepared (calibrated or QAT) model and, for every layer
that owns fake quants (its weight and/or output fake quant), runs the model with *only that
layer* quantized and every other fake quant passing values through (float), in VALIDATION
state. The drop of the metric against the all-float run ranks the layers; ties (a metric such
as accuracy often does not move for one layer) are broken by the SQNR of the model output
against the all-float output, so the ranking is total.

``suggest_int16`` then picks, within a budget, the most sensitive layers whose output may be
int16 on the march (``march.activation_dtypes``), and ``try_int16`` applies the suggestion to
the very quantized model (same weights and scales; the int16 outputs re-calibrated) and
measures the fixed-point model before and after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from qatkit.analysis.compare import _num, as_args, cosine, evaluation, sqnr_db, stage
from qatkit.base.errors import fail
from qatkit.base.march import March, get_march, resolve
from qatkit.quantization.fake_quant import FakeQuantize, FakeQuantState, fake_quants

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def owner(fq_name: str) -> str:
    """``'conv1.activation_post_process'`` -> ``'conv1'``."""
    return fq_name.rpartition(".")[0]


def quantizable_layers(model: nn.Module) -> dict[str, list[FakeQuantize]]:
    """Layer name -> its fake quants (weight and output), in module order."""
    out: dict[str, list[FakeQuantize]] = {}
    for name, fq in fake_quants(model):
        out.setdefault(owner(name), []).append(fq)
    return out


@contextlib.contextmanager
def quantize_only(model: nn.Module, layers: Iterable[str] | None) -> Iterator[nn.Module]:
    """Within the block, only the fake quants of ``layers`` quantize; every other fake quant
    of ``model`` passes values through unchanged (``layers=None``: all quantize; ``[]``: the
    model runs in float). Use it together with VALIDATION state (``compare.evaluation``)."""
    groups = quantizable_layers(model)
    keep = set(groups) if layers is None else set(layers)
    unknown = keep - set(groups)
    if unknown:
        raise fail("QK000", f"no fake-quantized layer named {', '.join(sorted(unknown))}.",
                   f"use one of {', '.join(groups) or '(none: prepare the model first)'}")
    with passthrough([fq for name, fqs in groups.items() if name not in keep for fq in fqs]):
        yield model


@contextlib.contextmanager
def passthrough(fqs: Iterable[FakeQuantize]) -> Iterator[None]:
    """Within the block, the fake quants ``fqs`` pass values through unchanged (float); the
    others quantize as before. The building block of :func:`quantize_only` and of
    ``qatkit.analysis.keep_float`` / ``qatkit.analysis.weights_activations``."""
    off = [fq for fq in fqs if "forward" not in fq.__dict__]  # nested blocks: the outer restores
    for fq in off:
        fq.__dict__["forward"] = _identity  # an instance attribute shadows forward
    try:
        yield
    finally:
        for fq in off:
            fq.__dict__.pop("forward", None)


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of the prepared ``model`` whose fake quants all pass values through: the float
    model with exactly the (fused, possibly QAT-trained) weights being quantized. Comparing
    against it separates quantization error from the weight changes QAT made."""
    import copy
    twin = copy.deepcopy(model)
    for _, fq in fake_quants(twin):
        fq.__dict__["forward"] = _identity
    return twin


def _outputs(model: nn.Module, x: Any, batch_size: int) -> torch.Tensor:
    """The model's output on ``x`` in batches (one output tensor per sample, concatenated)."""
    if isinstance(x, torch.Tensor):
        outs = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    else:
        args, kwargs = as_args(x)
        outs = [model(*args, **kwargs)]
    for o in outs:
        if not isinstance(o, torch.Tensor):
            raise fail("QK000", f"sensitivity needs a model with one output tensor, got "
                       f"{type(o).__name__}.", "wrap the model so that it returns one tensor")
    return torch.cat(outs)


def output_sqnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """SQNR (dB) of ``output`` against ``reference``, capped at 200 dB (identical)."""
    v = sqnr_db(reference.reshape(-1).to(torch.float64), output.reshape(-1).to(torch.float64))
    return min(v, 200.0)


def targets(reference: torch.Tensor, y: torch.Tensor | None, metric: Metric | None,
            metric_name: str | None = None) -> tuple[torch.Tensor, Metric, str]:
    """(target, metric, its name) for the float model's output ``reference``: labels ``y``
    with top-1 accuracy by default; without labels, the float model's top-1 along dim 1
    (classes; per pixel for dense outputs), or for outputs without a class dim the float
    output itself, scored by :func:`output_sqnr`."""
    if y is not None:
        if len(y) != len(reference):
            raise fail("QK000", f"{len(y)} labels for {len(reference)} samples.",
                       "pass labels y matching the samples x")
        return y, metric or accuracy, metric_name or (
            getattr(metric, "__name__", "metric") if metric else "accuracy")
    if reference.dim() >= 2:
        return reference.argmax(1), metric or accuracy, metric_name or (
            getattr(metric, "__name__", "metric") if metric else "top-1 agreement with float")
    return reference, metric or output_sqnr, metric_name or (
        getattr(metric, "__name__", "metric") if metric else "output SQNR vs float (dB)")


def _op_name(mod: nn.Module) -> str:
    from qatkit.quantization.qat import QATOp
    return type(mod.op).__name__ if isinstance(mod, QATOp) else type(mod).__name__


def accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy of logits against labels (``qatkit.quantization.evaluate.accuracy``)."""
    from qatkit.quantization.evaluate import accuracy as acc
    return acc(output, target)


@dataclass
class LayerSensitivity:
    name: str
    op: str
    metric: float  # the metric with only this layer quantized
    drop: float  # reference (all float) minus metric
    output_sqnr_db: float  # model output vs the all-float output (inf: identical)
    output_cosine: float
    dtype: str | None  # output dtype (None: no output fake quant, e.g. int32 accumulator)
    int16_candidate: bool  # its output may move to int16 on the march
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metric"], d["drop"] = _num(d["metric"], 6), _num(d["drop"], 6)
        d["output_sqnr_db"] = _num(d["output_sqnr_db"], 2)
        d["output_cosine"] = _num(d["output_cosine"], 6)
        return d


@dataclass
class Sensitivity:
    """Layers ranked from most to least sensitive, and the int16 suggestion."""

    metric_name: str
    reference: float  # all layers float
    quantized: float  # all layers fake-quantized
    layers: list[LayerSensitivity]
    samples: int
    march: str | None = None
    int16_allowed: bool = False
    budget: int = 0
    suggestion: list[str] = field(default_factory=list)
    applied: dict[str, Any] | None = None  # try_int16's before/after
    notes: list[str] = field(default_factory=list)
    # the automatic dtype changes and fallbacks (qatkit.analysis.sensitivity_qconfig)
    changes: list[dict[str, Any]] = field(default_factory=list)

    def ranking(self) -> list[str]:
        return [s.name for s in self.layers]

    def layer(self, name: str) -> LayerSensitivity:
        for s in self.layers:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric_name, "reference": _num(self.reference, 6),
                "quantized": _num(self.quantized, 6), "samples": self.samples,
                "march": self.march, "int16_allowed": self.int16_allowed,
                "budget": self.budget, "suggestion": list(self.suggestion),
                "applied": dict(self.applied) if self.applied is not None else None,
                "layers": [s.to_dict() for s in self.layers], "notes": list(self.notes),
                "changes": [dict(c) for c in self.changes]}


def _march_of(model: nn.Module, march: str | March | None) -> March | None:
    if march is not None:
        return resolve(march)
    if get_march() is not None:
        return get_march()
    from qatkit.quantization import meta
    m = meta.get(model)
    return resolve(m.march) if m is not None else None


def sensitivity(model: nn.Module, x: Any, y: torch.Tensor | None = None,
                metric: Metric | None = None, *, metric_name: str | None = None,
                layers: Iterable[str] | None = None, march: str | March | None = None,
                budget: int = 0, batch_size: int = 512, min_drop: float = 0.01,
                max_output_sqnr_db: float = 30.0) -> Sensitivity:
    """Rank the layers of the prepared ``model`` by the damage each does alone.

    ``x``: inputs (a tensor of samples, batched by ``batch_size``, or one batch as the model
    takes it); ``y``: labels. ``metric(output, target)`` is "higher is better" (default: top-1
    accuracy against ``y``; without ``y``, agreement with the all-float model: see
    :func:`targets`).
    ``budget`` > 0 also fills ``suggestion`` (see :func:`suggest_int16`, which
    ``min_drop`` and ``max_output_sqnr_db`` are passed to)."""
    st = stage(model)
    if st in ("float", "converted"):
        raise fail("QK000", f"sensitivity needs a prepared (calibrated or QAT) model; this one "
                   f"is {'a float' if st == 'float' else 'a converted (fixed-point)'} model, "
                   "whose layers cannot be switched to float one by one.",
                   "pass the calibrated or QAT model that you convert")
    groups = quantizable_layers(model)
    names = list(groups) if layers is None else list(layers)
    the_march = _march_of(model, march)
    int16 = the_march is not None and "qint16" in the_march.activation_dtypes
    with evaluation(model):
        with quantize_only(model, []):
            ref_out = _outputs(model, x, batch_size)
        target, fn, name = targets(ref_out, y, metric, metric_name)
        reference = float(fn(ref_out, target))
        with quantize_only(model, None):
            quantized = float(fn(_outputs(model, x, batch_size), target))
        ref_flat = ref_out.reshape(-1).to(torch.float64)
        rows: list[LayerSensitivity] = []
        for n in names:
            with quantize_only(model, [n]):
                out = _outputs(model, x, batch_size)
            m = float(fn(out, target))
            flat = out.reshape(-1).to(torch.float64)
            act = [fq for fq in groups[n] if not fq.is_weight]
            dtype = act[0].dtype if act else None
            rows.append(LayerSensitivity(
                n, _op_name(model.get_submodule(n)), m, reference - m, sqnr_db(ref_flat, flat),
                cosine(ref_flat, flat), dtype,
                int16 and dtype == "qint8" and not act[0].fixed))
    rows.sort(key=lambda r: (-r.drop, r.output_sqnr_db, names.index(r.name)))
    for i, r in enumerate(rows):
        r.rank = i + 1
    result = Sensitivity(name, reference, quantized, rows, len(ref_out),
                         the_march.name if the_march else None, int16, budget)
    if budget > 0:
        result.suggestion = suggest_int16(result, budget, min_drop=min_drop,
                                          max_output_sqnr_db=max_output_sqnr_db)
    if the_march is not None and not int16:
        result.notes.append(f"march {the_march.name} has no int16 activations "
                            f"({', '.join(the_march.activation_dtypes)}): nothing to suggest")
    return result


def suggest_int16(result: Sensitivity, budget: int, *, min_drop: float = 0.01,
                  max_output_sqnr_db: float = 30.0) -> list[str]:
    """The at most ``budget`` most sensitive int16 candidates that matter: their metric drop
    is at least ``min_drop`` (one sample of a small test set is noise, hence 0.01), or the
    model output with only them quantized is below ``max_output_sqnr_db`` (their error is
    visible in the output even when the metric does not move on this data)."""
    if budget < 0:
        raise fail("QK000", f"budget must be >= 0, got {budget}.", "budget=2, say")
    out = []
    for r in result.layers:
        if len(out) >= budget:
            break
        if r.int16_candidate and (r.drop >= min_drop or r.output_sqnr_db < max_output_sqnr_db):
            out.append(r.name)
    return out


# ------------------------------------------------------------------------------ int16
def int16_mapping(model_quant: nn.Module, layers: Iterable[str]) -> Any:
    """A QConfigMapping that re-creates ``model_quant``'s qconfigs (by module name) with the
    output of ``layers`` in qint16."""
    from qatkit.quantization.qconfig import QConfig, QConfigMapping
    layers = set(layers)
    names = {n for n, _ in model_quant.named_modules()}
    missing = layers - names
    if missing:
        raise fail("QK000", f"no layer named {', '.join(sorted(missing))} in the model.")
    for name in sorted(layers):
        fq = getattr(model_quant.get_submodule(name), "activation_post_process", None)
        if not isinstance(fq, FakeQuantize):
            raise fail("QK000", f"layer {name!r} has no quantized output to move to int16 "
                       "(an int32 accumulator or high-precision output, or a float op).",
                       "pick layers marked 'int16 allowed' in the sensitivity table")
    mapping = QConfigMapping(None)
    for name, mod in model_quant.named_modules():
        q = getattr(mod, "qconfig", None)
        if not isinstance(q, QConfig) or not name:
            continue
        if name in layers and q.activation is not None:
            q = QConfig(q.activation.with_(dtype="qint16"), q.weight, q.high_precision_output)
        mapping.set_module_name(name, q)
    return mapping


def apply_int16(model_float: nn.Module, model_quant: nn.Module, layers: Iterable[str],
                example_inputs: Any, calibration: Iterable[Any]) -> nn.Module:
    """``model_quant`` with the outputs of ``layers`` in int16: the float model re-prepared
    with the same qconfigs except those outputs, ``model_quant``'s state (weights, scales)
    loaded, then only the int16 outputs calibrated on ``calibration`` (input batches) with
    every other layer quantized as before. Returns the prepared model in VALIDATION state."""

    from qatkit.quantization.meta import get as get_meta
    layers = list(layers)
    m = get_meta(model_quant)
    if m is None or stage(model_quant) == "converted":
        raise fail("QK000", "apply_int16 needs the prepared (calibrated or QAT) model.")
    the_march = resolve(m.march)
    if "qint16" not in the_march.activation_dtypes:
        raise fail("QK002", f"march {the_march.name} has no int16 activations.",
                   "keep int8, or target a march with qint16 (bayes, nash-*)")
    mapping = int16_mapping(model_quant, layers)
    new = apply_mapping(model_float, model_quant, mapping, example_inputs, calibration)
    for name in layers:
        fq = getattr(new.get_submodule(name), "activation_post_process", None)
        if not isinstance(fq, FakeQuantize) or fq.dtype != "qint16":
            raise fail("QK000", f"layer {name!r} got no int16 output fake quant.")
    return new


def apply_mapping(model_float: nn.Module, model_quant: nn.Module, mapping: Any,
                  example_inputs: Any, calibration: Iterable[Any]) -> nn.Module:
    """``model_float`` re-prepared with ``mapping`` under ``model_quant``'s march, with
    ``model_quant``'s state (weights, scales) loaded; every output fake quant whose dtype
    differs from ``model_quant``'s is calibrated afresh on ``calibration`` (input batches) with
    every other layer quantized as before (weight scales follow the weights). Returns the
    prepared model in VALIDATION state."""
    import warnings

    from qatkit.base.errors import QatkitWarning, strict
    from qatkit.base.march import set_march
    from qatkit.quantization.calibrate import _inputs
    from qatkit.quantization.meta import get as get_meta
    from qatkit.quantization.prepare import prepare
    m = get_meta(model_quant)
    if m is None or stage(model_quant) == "converted":
        raise fail("QK000", "applying a qconfig needs the prepared (calibrated or QAT) model.")
    the_march = resolve(m.march)
    with set_march(the_march), strict(False), warnings.catch_warnings():
        warnings.simplefilter("ignore", QatkitWarning)  # the doctor reports them
        new = prepare(model_float, example_inputs, mapping)
    try:
        new.load_state_dict(model_quant.state_dict())
    except RuntimeError as e:
        raise fail("QK000", "the quantized model's state does not fit the float model "
                   f"re-prepared with the same qconfigs: {' '.join(str(e).split())[:300]}",
                   "pass the float model the quantized model was prepared from, and prepare "
                   "it with the default fusion") from None
    old = dict(fake_quants(model_quant))
    targets = {}
    for name, fq in fake_quants(new):
        was = old.get(name)
        if fq.is_weight or fq.fixed or (was is not None and was.dtype == fq.dtype):
            continue
        owner_q = new.get_submodule(owner(name)).qconfig
        fq.observer = owner_q.activation.make_observer()  # int8 statistics do not carry over
        targets[id(fq)] = fq
    new.eval()
    for _, fq in fake_quants(new):
        fq.state = FakeQuantState.CALIBRATION if id(fq) in targets else \
            FakeQuantState.VALIDATION
    batches = 0
    with torch.no_grad():
        for batch in calibration:
            new(*_inputs(new, batch))
            batches += 1
    if batches == 0 and targets:
        raise fail("QK008", "no calibration data for the outputs that changed dtype.",
                   "pass a non-empty iterable of input batches")
    for fq in targets.values():
        fq.update_scale()
        fq.state = FakeQuantState.VALIDATION
    return new


def try_int16(model_float: nn.Module, model_quant: nn.Module, layers: Iterable[str],
              example_inputs: Any, calibration: Iterable[Any], x: Any,
              y: torch.Tensor | None = None, metric: Metric | None = None,
              batch_size: int = 512) -> dict[str, Any]:
    """The fixed-point metric of ``model_quant`` and of :func:`apply_int16`'s model:
    ``{"layers", "before", "after", "gain"}`` (without ``y``: agreement with the float
    model)."""
    import warnings

    from qatkit.base.errors import QatkitWarning, strict
    from qatkit.quantization.convert import convert
    layers = list(layers)
    with evaluation(model_float):
        ref = _outputs(model_float, x, batch_size)
    target, fn, _ = targets(ref, y, metric)
    new = apply_int16(model_float, model_quant, layers, example_inputs, calibration)
    with strict(False), warnings.catch_warnings():
        warnings.simplefilter("ignore", QatkitWarning)
        before_model = convert(model_quant)
        after_model = convert(new)
    with torch.no_grad():
        before = float(fn(_outputs(before_model.eval(), x, batch_size), target))
        after = float(fn(_outputs(after_model.eval(), x, batch_size), target))
    return {"layers": layers, "before": _num(before, 6), "after": _num(after, 6),
            "gain": _num(after - before, 6), "model": "fixed point"}


__all__ = ["LayerSensitivity", "Sensitivity", "apply_int16", "apply_mapping", "float_copy",
           "int16_mapping", "output_sqnr", "passthrough", "quantizable_layers", "quantize_only",
           "sensitivity",
           "suggest_int16", "targets", "try_int16"]
