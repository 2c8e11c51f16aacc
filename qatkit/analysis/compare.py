"""Per-layer comparison of two stages of one model: where does the error come from?

``compare(model_a, model_b, inputs)`` runs both models on the same batch, records every layer's
inputs and output with the one recorder of model execution (``qatkit.base.recorder``;
FloatFunctional methods report themselves) and matches layers by qualified module name; the
k-th call of a module called several times is ``name#k`` (as ``qatkit.quantization.trace`` numbers
calls). For each layer it reports

* the *accumulated* error of B against A: cosine similarity, SQNR (dB), max and mean absolute
  error, and the max error in units of the layer's output scale (LSB);
* the layer's *own* error: B's layer run on A's recorded input (identical inputs), so error
  that arrived from upstream is excluded. When B is fixed point its input is A's input
  quantized to B's input scale, and A's layer is re-run on those very (dequantized) values, so
  both sides see identical numbers and only the layer's weights, arithmetic and output
  rounding differ.

Fixed-point outputs are dequantized. A float model compared with a fused prepared/converted
model is fused first (a copy), so that ``conv1`` means conv+BN+ReLU on both sides.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from qatkit.base import recorder
from qatkit.base.errors import fail
from qatkit.base.qtensor import QTensor
from qatkit.base.quant_math import TORCH_DTYPE, quantize
from qatkit.quantization.fake_quant import FakeQuantize, FakeQuantState, fake_quants

# Modules that only hand values on: no layer of their own in the comparison.
_SKIP_TYPES: tuple[type, ...] = (nn.Identity, nn.Dropout)

# Default side names. A prepared model in VALIDATION state looks the same whether it was only
# calibrated or trained with QAT, hence one name; pass names=("calibrated", "QAT") to tell.
STAGE_LABELS = {"float": "float", "prepared": "fake quant", "calibrated": "fake quant",
                "qat": "fake quant", "converted": "fixed point"}


# ------------------------------------------------------------------------------ recording
@dataclass
class Call:
    """One top-level layer call seen by :class:`Recorder`."""

    label: str  # "name" or "name#k" for the k-th call (k >= 1)
    name: str
    call: int
    module: nn.Module
    method: str | None  # FloatFunctional method, None for forward
    args: tuple
    kwargs: dict[str, Any]
    output: Any
    out_scale: tuple[torch.Tensor, str, int | None] | None = None  # (scale, dtype, axis)
    prequant: list[torch.Tensor] = field(default_factory=list)  # inputs of its output fq
    in_scales: list[tuple[torch.Tensor, str, int | None] | None] = field(
        default_factory=list)  # quantization scale of each tensor input, when known


def _output_fq(mod: nn.Module) -> FakeQuantize | None:
    app = getattr(mod, "activation_post_process", None)
    return app if isinstance(app, FakeQuantize) and not app.is_weight else None


def bypassed(fq: nn.Module) -> bool:
    """True while ``qatkit.analysis.sensitivity.quantize_only`` makes ``fq`` pass values through."""
    return "forward" in fq.__dict__


def _is_passthrough(mod: nn.Module, method: str | None) -> bool:
    from qatkit.quantization.registry import keeps_scale
    return method is None and keeps_scale(mod)


def walk(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with every tensor/QTensor leaf replaced by ``fn(leaf)`` (tuples, lists, dicts)."""
    if isinstance(obj, (torch.Tensor, QTensor)):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(walk(o, fn) for o in obj)
    if isinstance(obj, list):
        return [walk(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: walk(v, fn) for k, v in obj.items()}
    return obj


def leaves(obj: Any) -> list[Any]:
    out: list[Any] = []
    walk(obj, lambda t: out.append(t))
    return out


def _detach(t: Any) -> Any:
    # Clone: an in-place op downstream (ReLU(inplace=True)) must not change what we recorded.
    if isinstance(t, QTensor):
        return QTensor(t.q.detach().clone(), t.scale.detach().clone(), t.dtype, t.axis)
    return t.detach().clone()


class Recorder(recorder.Recorder):
    """Reports every top-level layer call of ``model`` to ``on_call``, as a context manager.

    Layers are what the one recorder of model execution (:class:`qatkit.base.recorder.Recorder`)
    records: leaf modules (QAT and fixed-point modules, stubs, plain leaf modules) and
    FloatFunctional/QFunctional method calls; ``nn.Identity`` and ``nn.Dropout`` are skipped.
    ``Call.out_scale`` is the output's quantization scale when known (a QTensor's, the layer's
    output fake quant's, or the input's for pass-through ops); ``Call.prequant`` holds what the
    layer's output fake quant received (values before rounding and clipping)."""

    skip_types = _SKIP_TYPES

    def __init__(self, model: nn.Module, on_call: Callable[[Call], None],
                 snapshot: bool = False) -> None:
        super().__init__(model)
        self.on_call = on_call
        self.snapshot = snapshot  # copy inputs before the layer runs (in-place ops)
        self._inputs: dict[int, tuple[tuple, dict]] = {}  # id(Call) -> inputs at begin
        self._prequant: dict[int, list[torch.Tensor]] = {}  # id(owner) -> its fq's inputs
        self._fq_owner: dict[int, nn.Module] = {}
        self._scales: dict[int, tuple[torch.Tensor, str, int | None]] = {}
        self._alive: list[Any] = []  # keeps outputs alive so that their ids stay unique
        self._extra: list[Any] = []

    def begin(self, call: recorder.Call) -> None:
        if self.snapshot:
            self._inputs[id(call)] = (walk(call.args, _detach), walk(call.kwargs, _detach))
        self._prequant.pop(id(call.module), None)

    def end(self, call: recorder.Call) -> Any:
        args, kwargs = self._inputs.pop(id(call), (call.args, call.kwargs))
        if self.snapshot and call.method is not None:  # a functional: reported after it ran
            args, kwargs = walk(args, _detach), walk(kwargs, _detach)
        c = Call(call.label, call.name, call.index, call.module, call.method, args, kwargs,
                 call.output)
        c.in_scales = [(t.scale, t.dtype, t.axis) if isinstance(t, QTensor) else
                       self._scales.get(id(t)) for t in leaves((call.args, call.kwargs))]
        c.prequant = self._prequant.pop(id(call.module), [])
        c.out_scale = self._scale_of(c)
        for t in leaves(c.output):
            self._alive.append(t)
            if c.out_scale is not None:
                self._scales[id(t)] = c.out_scale
        self.on_call(c)
        return None

    def _scale_of(self, c: Call) -> tuple[torch.Tensor, str, int | None] | None:
        outs = leaves(c.output)
        if outs and isinstance(outs[0], QTensor):
            q = outs[0]
            return q.scale, q.dtype, q.axis
        if outs and isinstance(outs[0], torch.Tensor) and outs[0].dtype == torch.float16:
            return _FLOAT16
        fq = _output_fq(c.module)
        if fq is not None and fq.is_float16:
            return _FLOAT16
        if fq is not None and bool(fq.initialized) and fq.state is not \
                FakeQuantState.CALIBRATION and not bypassed(fq):
            return fq.scale.detach(), fq.dtype, None
        if _is_passthrough(c.module, c.method):  # hands on its input's scale
            return next((s for s in c.in_scales if s is not None), None)
        return None

    def _fq_pre(self, fq: nn.Module, args: tuple) -> None:
        owner = self._fq_owner.get(id(fq))
        if owner is not None and args and isinstance(args[0], torch.Tensor):
            self._prequant.setdefault(id(owner), []).append(args[0])

    def _model_pre(self, mod: nn.Module, args: tuple) -> None:
        if self.depth == 0:
            self._scales, self._alive = {}, []
        super()._model_pre(mod, args)

    def __enter__(self) -> Recorder:
        for mod in self.model.modules():
            fq = _output_fq(mod)
            if fq is not None:
                self._fq_owner[id(fq)] = mod
                self._extra.append(fq.register_forward_pre_hook(self._fq_pre))
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for h in self._extra:
            h.remove()
        self._extra, self._alive, self._scales, self._prequant = [], [], {}, {}


# ------------------------------------------------------------------------------ model state
def stage(model: nn.Module) -> str:
    """``float``, ``prepared``, ``calibrated``, ``qat`` or ``converted``."""
    from qatkit.doctor.check import detect_stage
    return detect_stage(model)[0]


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` for diagnosis: ``eval()``, fake quants in VALIDATION, no gradient; the
    mode, the fake-quant states and the QK006 batch counters are restored afterwards (these
    forwards measure the model, they are not an evaluation loop)."""
    modes = {m: m.training for m in model.modules()}
    fqs = fake_quants(model)
    states = {id(fq): fq.state for _, fq in fqs}
    counters = {id(m): m.__dict__.get("_qatkit_validation_batches") for m in model.modules()}
    model.eval()
    for _, fq in fqs:
        if fq.state is FakeQuantState.CALIBRATION and fq.scale_pending:
            fq.update_scale()
        fq.state = FakeQuantState.VALIDATION
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, was in modes.items():
            m.training = was
        for _, fq in fqs:
            fq.state = states[id(fq)]
        for m in model.modules():
            n = counters.get(id(m))
            if n is None:
                m.__dict__.pop("_qatkit_validation_batches", None)
            else:
                m.__dict__["_qatkit_validation_batches"] = n


def as_args(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, tuple):
        return inputs, {}
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, list) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs), {}
    raise fail("QK000", f"inputs of type {type(inputs).__name__} are not a tensor, a tuple of "
               "inputs or a dict of keyword inputs.", "pass one batch as the model takes it")


def align_float(float_model: nn.Module, other: nn.Module, example_inputs: Any) -> nn.Module:
    """A fused copy of ``float_model`` when ``other`` was prepared with fusion (BN and ReLU
    folded into the convs): then layer names mean the same thing on both sides."""
    from qatkit.quantization.fuse import fuse, is_fused
    if stage(float_model) != "float" or is_fused(float_model):
        return float_model
    if stage(other) == "float" or not is_fused(other):
        return float_model
    return fuse(float_model, example_inputs)


def record(model: nn.Module, inputs: Any) -> tuple[list[Call], Any]:
    """Run ``model`` once (in :func:`evaluation` mode) and return its layer calls, with
    detached copies of their inputs and outputs, and the model's output."""
    calls: list[Call] = []

    def keep(c: Call) -> None:
        c.output = walk(c.output, _detach)
        c.prequant = []
        calls.append(c)

    args, kwargs = as_args(inputs)
    with evaluation(model), Recorder(model, keep, snapshot=True):
        out = model(*args, **kwargs)
    return calls, walk(out, _detach)


# ------------------------------------------------------------------------------ metrics
# the "scale" of a float16 value: none (its dtype is what a comparison reports)
_FLOAT16 = (torch.ones(()), "float16", None)


def to_float(x: Any) -> torch.Tensor:
    return x.dequantize() if isinstance(x, QTensor) else x


def _flat(x: Any) -> torch.Tensor:
    ts = [to_float(t).detach().reshape(-1).to(torch.float64) for t in leaves(x)]
    return torch.cat(ts) if ts else torch.zeros(0, dtype=torch.float64)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float((a @ b) / (na * nb))


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """``10 log10(sum ref^2 / sum (test - ref)^2)``; ``inf`` when identical."""
    noise = float(((test - ref) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _lsb(err: torch.Tensor, like: Any, scale: tuple[torch.Tensor, str, int | None] | None
         ) -> torch.Tensor | None:
    """Signed error in units of the output scale (per channel along its axis)."""
    if scale is None or scale[1] in ("qint32", "float16"):  # no useful unit: an accumulator,
        # a float16 value (spec section 19)
        return None
    s, _, axis = scale
    s = s.detach().to(torch.float64)
    t = to_float(leaves(like)[0]) if leaves(like) else None
    if t is None or err.numel() != t.numel():
        return None
    e = err.reshape(t.shape)
    if s.dim() > 0 and axis is not None:
        shape = [1] * e.dim()
        shape[axis] = -1
        s = s.reshape(shape)
    return e / s


@dataclass
class LayerComparison:
    """One layer, B against A. Errors are ``B - A`` on B's output (dequantized)."""

    name: str  # "module" or "module#k" for the k-th call of a shared module
    module: str
    call: int
    op: str  # B's layer: class name, or FloatFunctional method
    index: int  # position along the depth of the model (B's call order)
    shape: list[int]
    dtype: str | None  # output dtype of the quantized side (None: float, no scale known)
    scale: float | None  # per-tensor output scale (None: per-channel or unknown)
    per_channel: bool
    cosine: float
    sqnr_db: float  # inf when identical
    max_abs_error: float
    mean_abs_error: float
    max_error_lsb: float | None
    own_sqnr_db: float | None  # the error this layer adds with identical inputs
    own_max_abs_error: float | None
    own_max_error_lsb: float | None
    input_scales: list[float | None] = field(default_factory=list)  # B's, per tensor input
    error_hist: dict[str, Any] = field(default_factory=dict)  # of B - A (LSB when known)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("cosine",):
            d[k] = _num(d[k], 6)
        for k in ("sqnr_db", "own_sqnr_db"):
            d[k] = _num(d[k], 2)
        for k in ("max_abs_error", "mean_abs_error", "own_max_abs_error", "scale"):
            d[k] = _sig(d[k])
        for k in ("max_error_lsb", "own_max_error_lsb"):
            d[k] = _num(d[k], 3)
        d["input_scales"] = [_sig(v) for v in self.input_scales]
        return d


def _num(x: float | None, digits: int) -> float | None:
    """JSON-safe rounding: inf/nan become None (shown as 'exact' or '-')."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def _sig(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{float(x):.{digits}g}")


@dataclass
class Comparison:
    """Per-layer comparison of stage ``b`` against stage ``a``."""

    a: str
    b: str
    layers: list[LayerComparison]
    output: dict[str, Any]  # the model outputs: cosine, sqnr_db, max_abs_error, agreement
    only_a: list[str] = field(default_factory=list)  # layers found on one side only
    only_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: int = 0

    def layer(self, name: str) -> LayerComparison:
        for lc in self.layers:
            if lc.name == name:
                return lc
        raise KeyError(name)

    def ranking(self, by: str = "own") -> list[LayerComparison]:
        """Layers from worst to best: by own-error SQNR (``own``, the default) or by
        accumulated SQNR (``accumulated``). Exact layers come last."""
        key = "own_sqnr_db" if by == "own" else "sqnr_db"

        def k(lc: LayerComparison) -> tuple[float, int]:
            v = getattr(lc, key)
            return (math.inf if v is None or math.isnan(v) else v, lc.index)
        return sorted(self.layers, key=k)

    def worst(self, by: str = "own") -> LayerComparison | None:
        r = self.ranking(by)
        return r[0] if r else None

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "samples": self.samples,
                "layers": [lc.to_dict() for lc in self.layers],
                "ranking": [lc.name for lc in self.ranking()],
                "output": dict(self.output), "only_a": list(self.only_a),
                "only_b": list(self.only_b), "notes": list(self.notes)}


def _histogram(err: torch.Tensor, lsb: torch.Tensor | None, bins: int) -> dict[str, Any]:
    vals, unit = (lsb.reshape(-1), "lsb") if lsb is not None else (err.reshape(-1), "abs")
    vals = vals[torch.isfinite(vals)]
    if vals.numel() == 0:
        return {"unit": unit, "edges": [], "counts": []}
    m = float(vals.abs().max())
    m = m if m > 0 else 1.0
    counts = torch.histc(vals.to(torch.float64), bins=bins, min=-m, max=m)
    edges = torch.linspace(-m, m, bins + 1, dtype=torch.float64)
    return {"unit": unit, "edges": [_sig(float(e)) for e in edges],
            "counts": [int(c) for c in counts]}


# ------------------------------------------------------------------------------ own error
def _quantize_like(x: Any, like: Any) -> Any:
    """``x`` (float or QTensor from side A) in the domain of ``like`` (side B's value)."""
    if isinstance(like, torch.Tensor) and like.dtype == torch.float16:  # a float16 op's input
        return to_float(x).to(torch.float16)
    if isinstance(like, QTensor):
        if isinstance(x, QTensor) and x.dtype == like.dtype and x.axis == like.axis and \
                torch.equal(x.scale, like.scale):
            return x
        q = quantize(to_float(x), like.scale, like.dtype, like.axis)
        return QTensor(q.to(TORCH_DTYPE[like.dtype]), like.scale, like.dtype, like.axis)
    if isinstance(x, QTensor):
        return x.dequantize()
    return x


def _zip_like(a: Any, b: Any) -> Any:
    """A's recorded arguments converted to B's domain, leaf by leaf (None if they differ)."""
    if isinstance(a, (torch.Tensor, QTensor)) and isinstance(b, (torch.Tensor, QTensor)):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError("shape")
        return _quantize_like(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        out = [_zip_like(x, y) for x, y in zip(a, b)]
        return tuple(out) if isinstance(a, tuple) else out
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _zip_like(a[k], b[k]) for k in a}
    if isinstance(a, (torch.Tensor, QTensor)) or isinstance(b, (torch.Tensor, QTensor)):
        raise ValueError("structure")
    return a


def _rerun(c: Call, args: tuple, kwargs: dict) -> Any:
    fn = getattr(c.module, c.method) if c.method else c.module
    if c.method:  # recorded arguments the method does not take (add's c=None) are dropped
        names = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    if c.method in ("cat", "concat", "stack"):  # recorded flat; the method takes one list
        return fn(list(args), **kwargs)
    return fn(*args, **kwargs)


def _own_error(ca: Call, cb: Call) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A's output, B's output) of this layer on identical inputs, flattened, or None. Both
    models must be in :func:`evaluation` mode."""
    try:
        b_args = _zip_like(ca.args, cb.args)
        b_kwargs = _zip_like(ca.kwargs, cb.kwargs)
    except ValueError:
        return None
    converted = any(isinstance(t, QTensor) for t in leaves((b_args, b_kwargs))) and not any(
        isinstance(t, QTensor) for t in leaves((ca.args, ca.kwargs)))
    out_b = _rerun(cb, b_args, b_kwargs)
    # when converted, A sees exactly the values B saw: its input, rounded to B's input scale
    out_a = _rerun(ca, walk(b_args, to_float), walk(b_kwargs, to_float)) if converted \
        else ca.output
    fa, fb = _flat(out_a), _flat(out_b)
    return (fa, fb) if fa.shape == fb.shape else None


def _compare_layer(ca: Call, cb: Call, index: int, own_error: bool, hist_bins: int
                   ) -> LayerComparison | None:
    fa, fb = _flat(ca.output), _flat(cb.output)
    if fa.shape != fb.shape:
        return None
    scale = cb.out_scale or ca.out_scale
    err = fb - fa
    lsb = _lsb(err, cb.output, scale)
    own = _own_error(ca, cb) if own_error else None
    own_err = own[1] - own[0] if own is not None else None
    own_lsb = _lsb(own_err, cb.output, scale) if own_err is not None else None
    s = scale[0] if scale is not None else None
    first = leaves(cb.output)
    return LayerComparison(
        name=cb.label, module=cb.name, call=cb.call,
        op=cb.method or type(cb.module).__name__, index=index,
        shape=list(to_float(first[0]).shape) if first else [],
        dtype=scale[1] if scale is not None else None,
        scale=float(s) if s is not None and s.numel() == 1 and scale[1] != "float16" else None,
        per_channel=s is not None and s.numel() > 1,
        cosine=cosine(fa, fb), sqnr_db=sqnr_db(fa, fb),
        max_abs_error=float(err.abs().max()) if err.numel() else 0.0,
        mean_abs_error=float(err.abs().mean()) if err.numel() else 0.0,
        max_error_lsb=float(lsb.abs().max()) if lsb is not None and lsb.numel() else None,
        own_sqnr_db=sqnr_db(own[0], own[1]) if own is not None else None,
        own_max_abs_error=float(own_err.abs().max()) if own_err is not None and
        own_err.numel() else None,
        own_max_error_lsb=float(own_lsb.abs().max()) if own_lsb is not None and
        own_lsb.numel() else None,
        input_scales=[float(t[0]) if t is not None and t[0].numel() == 1 and
                      t[1] not in ("qint32", "float16") else None for t in cb.in_scales],
        error_hist=_histogram(err, lsb, hist_bins))


# ------------------------------------------------------------------------------ compare
def compare(model_a: nn.Module, model_b: nn.Module, inputs: Any, *,
            names: tuple[str, str] | None = None, own_error: bool = True,
            hist_bins: int = 41) -> Comparison:
    """Compare every layer of ``model_b`` with the same layer of ``model_a`` on one batch.

    Typical pairs: (float, QAT), (QAT, fixed point), (float, fixed point), (calibrated, QAT).
    ``inputs`` is one batch as the models take it (a tensor, a tuple, or a dict of keyword
    inputs); a few hundred samples are plenty. ``names`` labels the two sides (default: their
    stages). Neither model is changed: they run in eval mode with fake quants in VALIDATION
    state and are restored afterwards. ``own_error=False`` skips the identical-input reruns."""
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise fail("QK000", "compare needs two nn.Module models (two stages of one model).",
                   "e.g. qatkit.analysis.compare.compare(float_model, quantized_model, x)")
    as_args(inputs)  # a clear error before anything runs
    st_a, st_b = stage(model_a), stage(model_b)
    labels = names or (STAGE_LABELS.get(st_a, st_a), STAGE_LABELS.get(st_b, st_b))
    notes: list[str] = []
    if st_a == "float" and st_b != "float":
        fused = align_float(model_a, model_b, inputs)
        if fused is not model_a:
            notes.append(f"'{labels[0]}' was fused (BN and ReLU folded into the convs, as "
                         "prepare does) so that layer names match")
        model_a = fused
    if st_b == "float" and st_a != "float":
        model_b = align_float(model_b, model_a, inputs)
    calls_a, out_a = record(model_a, inputs)
    calls_b, out_b = record(model_b, inputs)
    by_a = {c.label: c for c in calls_a}
    labels_b = {c.label for c in calls_b}
    layers: list[LayerComparison] = []
    with evaluation(model_a), evaluation(model_b):  # for the identical-input reruns
        for cb in calls_b:
            ca = by_a.get(cb.label)
            if ca is None:
                continue
            lc = _compare_layer(ca, cb, len(layers), own_error, hist_bins)
            if lc is None:
                notes.append(f"'{cb.label}': output sizes differ; skipped")
                continue
            layers.append(lc)
            ca.args = ca.kwargs = cb.args = cb.kwargs = ()  # done with them: free memory
    fa, fb = _flat(out_a), _flat(out_b)
    output: dict[str, Any] = {}
    if fa.shape == fb.shape and fa.numel():
        output = {"cosine": _num(cosine(fa, fb), 6), "sqnr_db": _num(sqnr_db(fa, fb), 2),
                  "max_abs_error": _sig(float((fb - fa).abs().max()))}
        ta, tb = leaves(out_a), leaves(out_b)
        if len(ta) == 1 and len(tb) == 1 and to_float(ta[0]).dim() == 2:
            agree = (to_float(ta[0]).argmax(1) == to_float(tb[0]).argmax(1)).double().mean()
            output["top1_agreement"] = _num(float(agree), 6)
    first = leaves(as_args(inputs))
    return Comparison(labels[0], labels[1], layers, output,
                      only_a=[c.label for c in calls_a if c.label not in labels_b],
                      only_b=[c.label for c in calls_b if c.label not in by_a], notes=notes,
                      samples=int(first[0].shape[0]) if first and first[0].dim() else 1)


__all__ = ["Call", "Comparison", "LayerComparison", "Recorder", "compare", "evaluation",
           "record", "stage"]
