"""Guards: the doctor's rules run inside the workflow, at the moment a mistake happens.

The guards listen to the workflow's moments (``qatkit.base.hooks``): ``prepare``,
``fake_quant_state``, ``calibration_forward``, ``convert``, ``evaluate`` build a
:class:`~qatkit.doctor.rules.Context` for their stage and run its rules (:func:`check`):
error-level findings raise :class:`QatkitError` (so the workflow call fails there),
warning-level findings warn with :class:`QatkitWarning` (errors in strict mode), silenced
findings are logged for the report. ``prepared`` and ``converted`` attach the per-batch checks;
``model_forward`` and ``fixed_point_forward`` feed QK006 (evaluations, per model and epoch).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from qatkit.base import hooks, recorder
from qatkit.base.errors import QatkitError, silenced_codes, silenced_log, warn
from qatkit.base.frames import user_stacklevel
from qatkit.base.march import March
from qatkit.doctor.rules import Context, Finding, run
from qatkit.quantization import meta


def context(model: nn.Module, stage: str, march: March | None = None, graph: Any = None,
            example_inputs: Any = None, **kw: Any) -> Context:
    return Context(model=model, stage=stage, march=march, graph=graph,
                   example_inputs=example_inputs, **kw)


def check(ctx: Context, codes: Any = None) -> list[Finding]:
    """Run the rules of ``ctx.stage``; raise on the first error, warn on warnings."""
    return report(list(run(ctx, codes)))


def report(findings: list[Finding]) -> list[Finding]:
    """Raise on the first unsilenced error, warn on unsilenced warnings, log silenced ones."""
    errors = [f for f in findings if f.severity == "error" and f.silenced is None]
    if errors:
        first = errors[0]
        more = f" ({len(errors) - 1} more error(s): run qk.doctor.check for all)" \
            if len(errors) > 1 else ""
        raise QatkitError(first.code, _where(first) + first.message + more, first.fix)
    for f in findings:
        if f.silenced is not None:
            silenced_log.append((f.code, f.module, f.silenced))
        elif f.severity == "warning":
            warn(f.code, _where(f) + f.message, f.fix, stacklevel=user_stacklevel(2))
    return findings


def _where(f: Finding) -> str:
    if not f.module:
        return ""
    return f"module '{f.module}'" + (f" ({f.source})" if f.source else "") + ": "


def on_set_state(model: nn.Module, state: Any, wrapper: nn.Module | None = None) -> None:
    """Checks when fake-quant state changes (march consistency, multi-device calibration).
    ``wrapper`` is the model as passed to ``set_fake_quantize`` (e.g. a DataParallel)."""
    from qatkit.base.march import get_march
    m = meta.get(model)
    ctx = context(model, "calibration" if state.name == "CALIBRATION" else state.name.lower(),
                  get_march(), extra={"state": state, "recorded_march": m.march if m else None,
                                      "wrapper": wrapper if wrapper is not None else model})
    check(ctx)
    # Runtime checks at the input QuantStubs cannot see the root: hand them its silencing.
    table = silenced_codes(model)
    for stub in model.modules():
        if stub.__dict__.get("_qatkit_runtime"):
            stub.__dict__["_qatkit_root_silenced"] = table


# ---- runtime guards: per-batch checks at the input QuantStubs of a prepared model ----------

def attach_runtime(model: nn.Module, graph: Any) -> None:
    """Called by ``prepare``: hook the QuantStubs so calibration and validation batches are
    checked (QK004 DataParallel wrapping, QK005 camera input data). The hook costs an
    attribute lookup per batch."""
    from qatkit.doctor.rules.qk005_centered_yuv_input import input_stub_nodes
    from qatkit.quantization.fake_quant import FakeQuantize
    from qatkit.quantization.stubs import QuantStub
    inputs = {n.target for n in input_stub_nodes(graph)}
    order = [n.target for n in graph.nodes if isinstance(n.module, QuantStub)]
    facts = meta.get(model)
    source = facts.input_source if facts is not None else None
    camera = source in ("camera", "pyramid")
    primary = order[0] if order else None
    for name, stub in model.named_modules():
        if not isinstance(stub, QuantStub) or not isinstance(stub.activation_post_process,
                                                            FakeQuantize):
            continue
        d = stub.__dict__
        d["_qatkit_name"] = name
        d["_qatkit_input_stub"] = name in inputs
        # declared camera input, or undeclared with the camera's fixed scale (QK005 infers)
        fixed = stub.activation_post_process.fixed and abs(
            stub.activation_post_process.observer.fixed_scale - 1 / 128) < 1e-9
        d["_qatkit_camera"] = name in inputs and (camera or (source is None and fixed))
        d["_qatkit_primary"] = name == primary
        d["_qatkit_declared"] = (source, facts.processor if facts is not None else None)
        if not d.get("_qatkit_runtime"):
            d["_qatkit_runtime"] = True
            stub.register_forward_pre_hook(_stub_hook)


def _stub_hook(stub: nn.Module, args: tuple) -> None:
    if recorder.active() is not None:  # traces observe the model; they are not batches
        return
    state = getattr(stub.activation_post_process, "state", None)
    if state is None:
        return
    name = state.name
    if name == "CALIBRATION":
        _calibration_batch(stub, args)


def _calibration_batch(stub: nn.Module, args: tuple) -> None:
    from qatkit.doctor.rules import qk004_multi_device_calibration as qk004
    name = stub.__dict__.get("_qatkit_name", "")
    wrapped = qk004.inside_data_parallel()
    if wrapped:
        _runtime_report(stub, [qk004.runtime_finding(name, wrapped)])
    if stub.__dict__.get("_qatkit_camera") and not stub.__dict__.get("_qatkit_checked_input"):
        stub.__dict__["_qatkit_checked_input"] = True
        from qatkit.doctor.rules import qk005_centered_yuv_input as qk005
        source, processor = stub.__dict__.get("_qatkit_declared", ("camera", None))
        scale = qk005.stub_scale(context(stub, "calibration"), name, stub)
        ev = qk005.evidence(source, processor, scale)
        ctx = context(stub, "calibration", input_source="camera",
                      calibration_inputs=args[0] if args else None,
                      extra={"at_stub": name, "stub_scale": scale, "evidence": ev})
        _runtime_report(stub, list(qk005.RULE.check(ctx)))


def _runtime_report(stub: nn.Module, findings: list[Finding]) -> None:
    from qatkit.base.errors import silenced_reason
    root = stub.__dict__.get("_qatkit_root_silenced", {})
    for f in findings:
        f.silenced = silenced_reason(stub, f.code) or root.get(f.code)
    report(findings)


# ---- converted models -----------------------------------------------------------------------

def attach_converted(model: nn.Module) -> None:
    """Called by ``convert``: record the module types (QK008 finds ops added afterwards) and
    watch the modules added or swapped since prepare (they stayed float)."""
    facts = meta.get(model)
    if facts is not None:
        facts.structure = structure(model)
    watch_added(model, model.__dict__.get("_qatkit_prepared_structure"), "calibration/QAT")


def structure(model: nn.Module) -> dict[str, type]:
    """Qualified name -> module type, without fake-quant internals and the metadata."""
    return {n: type(m) for n, m in model.named_modules()
            if not _internal(n)}


def _internal(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == meta.META_NAME or any(
        p in ("activation_post_process", "weight_fake_quant") for p in parts)


def watch_added(model: nn.Module, recorded: dict[str, type] | None, since: str) -> None:
    """QK008 at run time: a module of the fixed-point model that is not in ``recorded`` (or
    has another type there) and is not in fixed-point form gets a pre-hook that refuses
    quantized inputs, naming the module. Such a module is fine where it computes on float
    values (after a DeQuantStub); a value-keeping one (ReLU, reshape) runs on integers."""
    if not recorded:
        return
    from qatkit.doctor.rules.common import is_marker
    from qatkit.fixed_point.modules import QDeQuantStub, QModule, QQuantStub
    from qatkit.fixed_point.yuv_input import QCenteredYUVToRGB
    from qatkit.quantization.registry import keeps_scale
    from qatkit.quantization.stubs import FloatFunctional
    for name, m in model.named_modules():
        if not name or _internal(name) or recorded.get(name) is type(m) or \
                m.__dict__.get("_qatkit_added"):
            continue
        if isinstance(m, (QModule, QDeQuantStub, QQuantStub)) or next(m.children(), None) \
                is not None or isinstance(m, QCenteredYUVToRGB):
            continue
        if keeps_scale(m) or (is_marker(m) and not isinstance(m, FloatFunctional)):
            continue
        m.__dict__["_qatkit_added"] = since
        m.__dict__["_qatkit_name"] = name  # FloatFunctional names itself in its QK008
        if not isinstance(m, FloatFunctional):
            m.register_forward_pre_hook(_added_module_hook)


def _added_module_hook(m: nn.Module, args: tuple) -> None:
    from qatkit.base.errors import fail
    from qatkit.base.qtensor import QTensor
    from qatkit.doctor.rules.common import user_type

    def quantized(a: Any) -> bool:
        return isinstance(a, QTensor) or (isinstance(a, (list, tuple)) and any(map(quantized, a)))
    if any(quantized(a) for a in args):
        name = m.__dict__.get("_qatkit_name", "")
        err = fail("QK008", f"module '{name}' ({user_type(m)}) receives quantized values in the "
                   f"fixed-point model but was added (or replaced) after "
                   f"{m.__dict__.get('_qatkit_added', 'calibration')}: it never saw "
                   "calibration/QAT data, so it has no output scale and no fixed-point form.",
                   _FIX_ADDED)
        err.qatkit_module = m
        raise err


_FIX_ADDED = ("add the op to the float model and go through prepare, calibration/QAT and "
              "convert again (or move it after the DeQuantStub, where it computes on floats)")


@hooks.on("model_forward")
def _on_model_forward(model: nn.Module, training: bool, state: Any) -> None:
    """QK006: evaluations of the QAT model, per model and per epoch."""
    from qatkit.doctor.rules import qk006_qat_evaluation as qk006
    from qatkit.quantization.forwards import lineage
    ctx = qk006.note_forward(model, lineage(model), training, state.name)
    if ctx is not None:
        report(list(run(ctx, ["QK006"])))


@hooks.on("fixed_point_forward")
def _on_fixed_point_forward(model: nn.Module) -> None:
    facts = meta.get(model)
    watch_added(model, facts.structure if facts else None, "convert")  # QK008 at run time
    from qatkit.doctor.rules import qk006_qat_evaluation as qk006
    from qatkit.quantization.forwards import lineage
    qk006.note_fixed_point_forward(lineage(model))


# ---- the workflow's moments ---------------------------------------------------------------

@hooks.on("prepare")
def _on_prepare(model: nn.Module, march: March, graph: Any, example_inputs: Any,
                qconfigs: dict, processor: str | None, input_source: str | None,
                history: Any) -> None:
    check(context(model, "prepare", march, graph, example_inputs, qconfigs=qconfigs,
                  processor=processor, input_source=input_source, history=history))


@hooks.on("prepared")
def _on_prepared(model: nn.Module, graph: Any) -> None:
    attach_runtime(model, graph)  # per-batch checks at the QuantStubs (QK004/5)
    model.__dict__["_qatkit_prepared_structure"] = structure(model)  # QK008 after convert


@hooks.on("fake_quant_state")
def _on_fake_quant_state(model: nn.Module, fake_quants: list, state: Any,
                         wrapper: nn.Module) -> None:
    on_set_state(model, state, wrapper=wrapper)  # QK004 refuses a DataParallel here


@hooks.on("calibration_forward")
def _on_calibration_forward(fake_quant: nn.Module) -> None:
    from qatkit.doctor.rules import qk004_multi_device_calibration as qk004
    err = qk004.forward_error(fake_quant)  # a DataParallel replica, or several processes
    if err is not None:
        raise err


@hooks.on("convert")
def _on_convert(model: nn.Module, march: March | None, recorded_march: str) -> None:
    check(context(model, "convert", march, extra={"recorded_march": recorded_march}))


@hooks.on("converted")
def _on_converted(model: nn.Module) -> None:
    attach_converted(model)  # QK008 (ops added later), QK006 (fixed-point evaluated)


@hooks.on("evaluate")
def _on_evaluate(model: nn.Module, march: March | None, recorded_march: str | None) -> None:
    check(context(model, "evaluate", march, extra={"recorded_march": recorded_march}))
