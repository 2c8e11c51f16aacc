"""prepare: swap a float model's modules for their QAT forms, per qconfig and march.

1. A march must be set (rule QK002). The input model is not modified: prepare works on a copy.
2. torch.ao eager-mode stubs and fused modules are swapped for qatkit's; the model is fused
   (``qatkit.quantization.fuse``) unless ``fuse=False``.
3. One traced forward on ``example_inputs`` gives the data flow: the deploy region between
   QuantStubs and DeQuantStubs, high-precision outputs, shared modules.
4. The guards of stage "prepare" run (qconfig outside the region, march support, shared
   FloatFunctionals, unsupported ops...), then modules are swapped:
   conv/linear -> ``qat.QAT*`` (weight + output fake quant), value-changing ops -> ``QATOp``,
   QuantStub / FloatFunctional -> output fake quant attached. ReLU, max pooling, reshapes keep
   their input scale and stay as they are.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any

import torch.nn as nn

from qatkit.base import hooks
from qatkit.base.errors import QatkitError, QatkitWarning, fail
from qatkit.base.march import get_march
from qatkit.base.modules import set_submodule
from qatkit.quantization import call_sites, consistency, forwards, meta, validate
from qatkit.quantization import trace as tr
from qatkit.quantization.compat import from_torch_ao
from qatkit.quantization.fake_quant import FakeQuantize
from qatkit.quantization.fuse import fuse as fuse_model
from qatkit.quantization.qconfig import (
    QConfig,
    QConfigMapping,
    QuantSpec,
    as_mapping,
    resolved_to_data,
    with_sources,
)
from qatkit.quantization.registry import GEMM_KINDS, keeps_scale, op_kind, to_qat
from qatkit.quantization.stubs import DeQuantStub, FloatFunctional, QuantStub


def high_precision_modules(g: tr.Graph, qconfigs: dict[str, QConfig | None]) -> set[str]:
    """GEMMs whose outputs are consumed only by DeQuantStubs (through reshapes)."""
    out: set[str] = set()
    for n in g.nodes:
        if n.kind != "module" or op_kind(n.module) not in GEMM_KINDS:
            continue
        q = qconfigs.get(n.target)
        if q is None or not q.high_precision_output or len(g.calls(n.target)) != 1:
            continue
        users = g.consumers(n, through_shape_ops=True)
        if users and not n.is_output and all(isinstance(u.module, DeQuantStub) for u in users):
            out.add(n.target)
    return out


def prepare(model: nn.Module, example_inputs: Any,
            qconfig: QConfig | QConfigMapping | None = None, *, fuse: bool = True,
            processor: str | None = None, input_source: str | None = None,
            history: dict[str, list[float]] | None = None) -> nn.Module:
    """Return the prepared copy of ``model`` (fake quants in QAT state).

    ``qconfig`` applies globally (or pass a :class:`QConfigMapping`); modules with a
    ``qconfig`` attribute, and their children, use it (``None`` keeps them float).
    ``processor`` declares the target chip (checked against the march, QK002);
    ``input_source="camera"`` declares centered YUV444 input (checked by QK005);
    ``history`` (per-epoch ``train_loss``/``val_loss``/``train_acc``/``val_acc`` of the float
    training) is checked for overfitting (QK009)."""
    validate.model(model, "qk.prepare")
    validate.stage(model, "qk.prepare", ("float", "prepared"))
    validate.inputs(example_inputs, "qk.prepare")
    march = get_march(required=True)
    original = model
    model = from_torch_ao(copy.deepcopy(model))
    try:
        call_sites.install(model, example_inputs)  # torch calls in forward -> operators
        if fuse:
            model = fuse_model(model, example_inputs, inplace=True)
        mapping = as_mapping(qconfig)
        qconfigs = consistency.apply(mapping.resolve(model), march)  # power-of-two scales
        g = tr.trace(model, example_inputs)
    except QatkitError:
        raise
    except Exception as e:  # the model's own forward: one clear line, the cause chained
        raise validate.forward_error(e, "example_inputs") from e
    validate.outputs_dequantized(g)  # else the fixed-point model would return a QTensor
    with _once_per_model(original):
        hooks.emit("prepare", model=model, march=march, graph=g, example_inputs=example_inputs,
                   qconfigs=qconfigs, processor=processor, input_source=input_source,
                   history=history)  # the doctor's prepare-stage rules: an error raises here
    region = tr.quantized_nodes(g)
    check_float16_boundaries(g, qconfigs, region, march.name)
    hp = high_precision_modules(g, qconfigs) if march.high_precision_output else set()
    for node in g.nodes:
        if node.kind not in ("module", "functional") or node.call or node.index not in region:
            continue
        q = qconfigs.get(node.target)
        mod = node.module
        if q is None or (q.activation is None and not isinstance(mod, QuantStub)):
            continue
        _swap(model, node.target, mod, q, march.pow2_scales, hp)
    for name, mod in model.named_modules():  # modules seen only outside a traced call
        if isinstance(mod, QuantStub) and not isinstance(mod.activation_post_process,
                                                         FakeQuantize):
            q = qconfigs.get(name)
            if q is not None:
                _swap(model, name, mod, q, march.pow2_scales, hp)
    facts = meta.attach(model, march.name, "prepared", processor, input_source)
    # enough to prepare again (and to say where each qconfig came from)
    facts.recipe = {"fuse": fuse, **with_sources(resolved_to_data(qconfigs), mapping)}
    forwards.announce(model, fixed_point=False)  # QK006 hears each forward the user runs
    hooks.emit("prepared", model=model, graph=g)  # the doctor hooks per-batch checks
    return model


def _float16(q: QConfig | None) -> bool:
    return q is not None and q.activation is not None and q.activation.dtype == "float16"


def _is_gemm(n: tr.Node) -> bool:
    return op_kind(n.module) in GEMM_KINDS or (n.kind == "functional" and n.op == "matmul")


def check_float16_boundaries(g: tr.Graph, qconfigs: dict[str, QConfig | None],
                             region: set[int], march: str) -> None:
    """float16 -> integer is an explicit quantization (spec section 19): every consumer of a
    float16 operator's output (through reshapes, ReLU, max pooling, which move values) is a
    float16 operator that is no GEMM, a QuantStub (the quantization, with its calibrated
    scale) or a DeQuantStub. A GEMM's inputs are integers on every march."""
    for n in g.nodes:
        if n.kind not in ("module", "functional") or n.index not in region:
            continue
        if _float16(qconfigs.get(n.target)) and _is_gemm(n) and n.kind == "functional":
            raise fail("QK002", f"{n.target!r} (matmul) has a float16 qconfig: a GEMM's "
                       f"operands are integers on {march}; only its output could be float16, "
                       "and qatkit gives a float16 output to conv/linear only.",
                       f"set_module_name({n.target!r}, <an integer qconfig>)")
        if not _float16(qconfigs.get(n.target)) or isinstance(n.module, DeQuantStub):
            continue
        todo, seen = g.consumers(n, through_shape_ops=True), set()
        while todo:
            u = todo.pop()
            if u.index in seen:
                continue
            seen.add(u.index)
            if isinstance(u.module, (QuantStub, DeQuantStub)):
                continue
            if u.kind == "function" or (u.kind == "module" and keeps_scale(u.module)):
                todo.extend(g.consumers(u, through_shape_ops=True))  # values moved, not changed
                continue
            if u.kind in ("module", "functional") and _float16(qconfigs.get(u.target)) \
                    and not _is_gemm(u):
                continue
            what = "a GEMM (integer inputs on every march)" if _is_gemm(u) else \
                "an integer operator"
            where = f" ({u.source})" if u.source else ""
            raise fail("QK102", f"{u.target!r} ({u.op}){where} is {what} and receives the float16 "
                       f"output of {n.target!r} ({n.op}, float16 on {march}) without a "
                       "quantization: float16 -> integer needs a scale, which only a "
                       "QuantStub calibrates (docs/fixed-point.md section 19).",
                       f"put a qk.QuantStub between {n.target!r} and {u.target!r}"
                       + ("" if _is_gemm(u) else ", or give it a float16 qconfig too"))


# float model -> the prepare-stage warnings already shown for it
_shown: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


class _once_per_model:
    """The documented flow prepares one float model twice (calibration, then QAT): each
    prepare-stage QatkitWarning is shown once per float model, at its first prepare."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._catch = warnings.catch_warnings(record=True)

    def __enter__(self) -> None:
        self._log = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc: Any) -> None:
        self._catch.__exit__(*exc)
        shown = _shown.setdefault(self.model, set())
        for w in self._log:  # re-issued at their own place, through the usual filters
            key = str(w.message)
            if isinstance(w.message, QatkitWarning):
                if key in shown:
                    continue
                shown.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                   source=w.source)


def _swap(model: nn.Module, name: str, mod: nn.Module, q: QConfig, pow2: bool, hp: set[str]
          ) -> None:
    if isinstance(mod, QuantStub):
        spec = q.activation or QuantSpec()
        if mod.scale is not None:
            spec = spec.with_(fixed_scale=mod.scale)
        if mod.dtype != "qint8" and spec.dtype == "qint8":
            spec = spec.with_(dtype=mod.dtype)
        mod.activation_post_process = FakeQuantize(spec, pow2)
        mod.qconfig = q
        return
    if isinstance(mod, FloatFunctional):
        mod.activation_post_process = FakeQuantize(q.activation, pow2)
        mod.activation_post_process._qatkit_owner_name = name  # named in float16 errors
        mod.qconfig = q
        return
    mode = "high_precision" if name in hp else (
        "accumulator" if getattr(mod, "feeds_add", False) else "quantized")
    qat = to_qat(mod, q, pow2, mode)  # the registry row's QAT form (None: stays as it is)
    if qat is not None and getattr(qat, "activation_post_process", None) is not None:
        qat.activation_post_process._qatkit_owner_name = name  # named in float16 errors
    if qat is not None:
        set_submodule(model, name, qat)
