"""``qk.doctor.check``: every rule that applies to a model at its stage, as one report.

The guards inside the workflow stop at the first error; the doctor collects everything and
never raises. It detects the model's stage (float, prepared, calibrated, QAT, converted) from
``qatkit_meta``, the fake quants and the module types, traces one forward on the example inputs
(a fused copy for a float model, as ``prepare`` would see it), and runs the rules of that stage.

Command line (``qatkit doctor`` or ``python -m qatkit.doctor.check``)::

    qatkit doctor FILE.py:FUNC [--march M | --processor P] [--input-shape 1,3,32,32]
        [--input-source camera|other] [--format text|json|html] [--output PATH] [--strict]

Exit status: 0 no error-level finding, 1 at least one, 2 usage error.
"""

from __future__ import annotations

import copy
import html
import io
import json
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from qatkit.base.errors import QatkitError
from qatkit.base.frames import user_line_of
from qatkit.base.march import March, get_march, resolve
from qatkit.base.modules import unwrap
from qatkit.doctor.rules import Context, Finding, all_rules, run
from qatkit.quantization import meta as _meta
from qatkit.quantization.fake_quant import FakeQuantize, FakeQuantState, fake_quants

STAGES = ("float", "prepared", "calibrated", "qat", "converted")
# Which rule stages apply to a model at each doctor stage, in order of preference: a rule that
# declares several of them runs once, with the first.
_RULE_STAGES = {"float": ("prepare", "float"), "converted": ("converted",)}


@dataclass
class Report:
    """What the doctor found. ``findings`` are the active ones, ``silenced`` those a
    ``qk.silence(module, code, reason)`` turned off (still listed)."""

    findings: list[Finding]
    silenced: list[Finding]
    stage: str
    march: str | None
    strict: bool = False
    notes: list[str] = field(default_factory=list)
    trace_error: BaseException | None = field(default=None, repr=False)

    def severity(self, f: Finding) -> str:
        """The severity that counts: in strict mode warnings are errors."""
        return "error" if self.strict and f.severity == "warning" else f.severity

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if self.severity(f) == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if self.severity(f) == "warning"]

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def summary(self) -> dict[str, Any]:
        return {"errors": len(self.errors), "warnings": len(self.warnings),
                "infos": sum(self.severity(f) == "info" for f in self.findings),
                "silenced": len(self.silenced), "strict": self.strict,
                "exit_code": self.exit_code}

    def _row(self, f: Finding) -> dict[str, Any]:
        return {"code": f.code, "severity": self.severity(f), "module": f.module,
                "message": f.message, "fix": f.fix, "source": f.source}

    def to_dict(self) -> dict[str, Any]:
        from qatkit.base import VERSION as __version__
        return {
            "findings": [self._row(f) for f in self.findings],
            "silenced": [{**self._row(f), "severity": f.severity, "reason": f.silenced}
                         for f in self.silenced],
            "march": self.march, "stage": self.stage, "summary": self.summary(),
            "notes": list(self.notes), "qatkit": __version__,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self, width: int = 120, color: bool = False) -> str:
        buf = io.StringIO()
        from rich.console import Console
        console = Console(file=buf, width=width, force_terminal=color, color_system=(
            "standard" if color else None), highlight=False)
        self.print(console)
        return buf.getvalue()

    def print(self, console: Any = None) -> None:
        """Print the report as a table (to ``console``, a ``rich.console.Console``)."""
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
        console = console or Console(highlight=False)
        head = (f"qatkit doctor: stage {self.stage}, march {self.march or 'not set'}"
                + (", strict" if self.strict else ""))
        console.print(Text(head, style="bold"))
        style = {"error": "bold red", "warning": "yellow", "info": "cyan"}
        if self.findings and console.width < 120:  # narrow: one block per finding
            for f in self.findings:
                sev = self.severity(f)
                head = Text(f"{f.code} ", style="bold")
                head.append(sev, style=style.get(sev, ""))
                head.append(f"  {f.module or '(model)'}" + (f" ({f.source})" if f.source else ""))
                console.print(head, overflow="ignore", crop=False)
                for label, body in (("", f.message), ("fix: ", f.fix)):
                    if body:
                        console.print(_wrap_words(label + body, console.width, "  "),
                                      overflow="ignore", crop=False, highlight=False,
                                      markup=False)  # "[i]" in a fix is text, not markup
        elif self.findings:
            t = Table(show_lines=True, expand=True)
            t.add_column("code", no_wrap=True)
            t.add_column("severity", no_wrap=True)
            # no identifier is broken mid-word: each column is at least its longest word
            t.add_column("module", overflow="fold", ratio=1, min_width=_longest_word(
                [f.module or "(model)" for f in self.findings] +
                [f.source or "" for f in self.findings], 20))
            t.add_column("finding", ratio=4, overflow="fold")
            t.add_column("fix", ratio=2, overflow="fold",
                         min_width=_longest_word([f.fix for f in self.findings], 40))
            for f in self.findings:
                sev = self.severity(f)
                where = f.module or "(model)"
                if f.source:
                    where += f"\n{f.source}"
                t.add_row(f.code, Text(sev, style=style.get(sev, "")), where, f.message, f.fix)
            console.print(t)
        else:
            console.print("No findings.")
        for f in self.silenced:
            console.print(Text(f"silenced {f.code} {f.module or '(model)'}: {f.silenced}",
                               style="dim"))
        for n in self.notes:
            console.print(Text(f"note: {n}", style="dim"))
        s = self.summary()
        console.print(Text(f"{s['errors']} error(s), {s['warnings']} warning(s), "
                           f"{s['silenced']} silenced", style="bold"))

    def to_html(self) -> str:
        e = html.escape
        rows = "".join(
            f"<tr class='{e(self.severity(f))}'><td>{e(f.code)}</td><td>{e(self.severity(f))}"
            f"</td><td>{e(f.module or '(model)')}<br><small>{e(f.source)}</small></td>"
            f"<td>{e(f.message)}</td><td>{e(f.fix)}</td></tr>" for f in self.findings)
        silenced = "".join(f"<li>{e(f.code)} {e(f.module or '(model)')}: {e(f.silenced or '')}"
                           "</li>" for f in self.silenced)
        notes = "".join(f"<li>{e(n)}</li>" for n in self.notes)
        s = self.summary()
        return (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>qatkit doctor</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
            "tr.error td:nth-child(2){color:#b00;font-weight:bold}"
            "tr.warning td:nth-child(2){color:#a60}</style></head><body>"
            f"<h1>qatkit doctor</h1><p>stage <b>{e(self.stage)}</b>, march "
            f"<b>{e(self.march or 'not set')}</b>{', strict' if self.strict else ''}: "
            f"{s['errors']} error(s), {s['warnings']} warning(s), {s['silenced']} silenced</p>"
            + (f"<table><tr><th>code</th><th>severity</th><th>module</th><th>finding</th>"
               f"<th>fix</th></tr>{rows}</table>" if rows else "<p>No findings.</p>")
            + (f"<h2>Silenced</h2><ul>{silenced}</ul>" if silenced else "")
            + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
            + "</body></html>\n")


# ------------------------------------------------------------------------------ the check
def detect_stage(model: nn.Module) -> tuple[str, FakeQuantState | None]:
    """The model's stage and, for prepared models, the state of its fake quants."""
    inner = unwrap(model)
    m = _meta.get(inner)
    fqs = [fq for _, fq in fake_quants(inner) if not fq.is_weight]
    if (m is not None and m.stage == "converted") or (not fqs and _has_fixed_point(inner)):
        return "converted", None
    if not fqs:
        return "float", None
    states = [fq.state for fq in fqs]
    state = max(set(states), key=lambda s: (states.count(s), s.value))
    if not _has_statistics(fqs):
        return "prepared", state
    return ("qat" if state is FakeQuantState.QAT else "calibrated"), state


def _has_fixed_point(model: nn.Module) -> bool:
    from qatkit.fixed_point.modules import QDeQuantStub, QModule
    return any(isinstance(m, (QModule, QDeQuantStub)) for m in model.modules())


def _has_statistics(fqs: list[FakeQuantize]) -> bool:
    return any(not fq.fixed and (fq.observer.seen or bool(fq.calibrated)
                                 or bool(fq.initialized)) for fq in fqs)


def _rule_stages(stage: str, state: FakeQuantState | None, fqs: list[FakeQuantize]
                 ) -> tuple[str, ...]:
    if stage in _RULE_STAGES:
        return _RULE_STAGES[stage]
    st = state.value if state is not None else "calibration"
    return (st, "convert") if _has_statistics(fqs) else (st,)


def _float_qconfigs(model: nn.Module, qconfig: Any, notes: list[str]) -> dict[str, Any]:
    from qatkit.quantization.qconfig import QConfigMapping, as_mapping, default_qat_qconfig
    if qconfig is not None:
        return as_mapping(qconfig).resolve(model)
    if any(getattr(m, "qconfig", None) is not None for m in model.modules()):
        return QConfigMapping().resolve(model)
    notes.append("the float model has no qconfig attributes: assumed qk.default_qat_qconfig() "
                 "for every module, as prepare(model, x, qconfig=...) would apply it")
    return as_mapping(default_qat_qconfig()).resolve(model)


class _TraceFailed(Exception):
    def __init__(self, error: BaseException, module: str) -> None:
        super().__init__(str(error))
        self.error, self.module = error, module


def _trace(model: nn.Module, example_inputs: Any) -> Any:
    """Trace, remembering the leaf module that was running if the forward fails."""
    from qatkit.quantization import trace as tr
    running: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []

    def enter(mod: nn.Module, args: Any) -> None:
        running.append(names.get(id(mod), "?"))

    def leave(mod: nn.Module, args: Any, out: Any) -> None:  # must return None: keeps `out`
        running.pop()

    for m in model.modules():
        if tr.is_leaf(m) and not isinstance(m, FakeQuantize):
            hooks.append(m.register_forward_pre_hook(enter))
            hooks.append(m.register_forward_hook(leave))
    try:
        return tr.trace(model, example_inputs)
    except Exception as e:
        raise _TraceFailed(e, running[-1] if running else "") from e
    finally:
        for h in hooks:
            h.remove()


class _FuseFailed(Exception):
    def __init__(self, error: QatkitError) -> None:
        super().__init__(str(error))
        self.error = error


def _fuse(model: nn.Module, example_inputs: Any, graph: Any) -> nn.Module:
    """Fuse ``model`` in place with the trace already made, and point that trace at the fused
    modules: fusion swaps modules one for one under the same names (BN and ReLU become
    Identity), so the data flow, and hence the graph, is unchanged. Saves a forward."""
    from qatkit.quantization.fuse import fuse
    try:
        fused = fuse(model, example_inputs, inplace=True, graph=graph)
    except QatkitError as e:
        raise _FuseFailed(e) from e
    graph.names = {id(m): n for n, m in fused.named_modules()}
    for node in graph.nodes:
        if node.module is not None:
            try:
                node.module = fused.get_submodule(node.target)
            except AttributeError:
                continue
            if node.kind == "module":
                node.op = type(node.module).__name__
    return fused


def check(model: nn.Module, example_inputs: Any = None, *, march: str | March | None = None,
          processor: str | None = None, input_source: str | None = None,
          history: dict[str, list[float]] | None = None, strict: bool = False,
          calibration_inputs: Any = None, qconfig: Any = None) -> Report:
    """Run every rule that applies to ``model`` at its stage; never raises for a finding.

    ``example_inputs`` drive one traced forward (without them the data-flow rules are
    skipped). ``march``/``processor`` name the target (default: the march set with
    ``qk.set_march``, else the one recorded in a prepared model). ``input_source="camera"``
    declares centered YUV444 input; ``history`` holds per-epoch metrics (QK009);
    ``calibration_inputs`` a batch as fed to the model; ``qconfig`` the qconfig a float model
    will be prepared with (default: its ``qconfig`` attributes, else qatkit's QAT default).
    In ``strict`` mode warnings count as errors."""
    notes: list[str] = []
    findings: list[Finding] = []
    wrapper = model
    model = unwrap(model)  # rules look at the model; QK004 at the wrapper (extra)
    stage, state = detect_stage(model)
    recorded = _meta.get(model)
    recorded_march = recorded.march if recorded is not None else None
    facts = _meta.get(model)
    processor = processor or (facts.processor if facts else None)
    input_source = input_source or (facts.input_source if facts else None)
    # The march: given, else set with qk.set_march, else recorded at prepare. A march that
    # does not match the processor is QK002's finding (the rule sees both), not an exception.
    the_march: March | None = None
    try:
        if march is not None:
            the_march = resolve(march)
        elif processor is not None:
            the_march = resolve(processor=processor)
        else:
            the_march = get_march() or (resolve(recorded_march) if recorded_march else None)
    except QatkitError as e:
        findings.append(Finding(e.code, "error", "", e.message, e.fix))

    fqs = [fq for _, fq in fake_quants(model) if not fq.is_weight]
    work, qconfigs, graph, trace_error = model, None, None, None
    try:
        if stage == "float":  # what prepare sees: the fused copy
            from qatkit.quantization.call_sites import install
            from qatkit.quantization.compat import from_torch_ao
            work = from_torch_ao(copy.deepcopy(model))
            if example_inputs is not None:
                try:  # torch calls in forward -> operators, as prepare makes them
                    install(work, example_inputs)
                except QatkitError as e:
                    findings.append(Finding(e.code, "error", "", e.message, e.fix))
                except Exception:
                    pass
                graph = _trace(work, example_inputs)
                work = _fuse(work, example_inputs, graph)
            qconfigs = _float_qconfigs(work, qconfig, notes)
        elif example_inputs is not None:
            if stage == "converted":  # ops added after convert refuse integers (QK008)
                from qatkit.doctor.guards import watch_added
                watch_added(work, recorded.structure if recorded else None, "convert")
            graph = _trace(work, example_inputs)
        if example_inputs is None:
            notes.append("no example inputs: the data-flow rules were skipped")
    except _FuseFailed as e:
        findings.append(Finding(e.error.code, "error", "", "fusion (as prepare would do it) "
                                "fails: " + e.error.message, e.error.fix))
        graph = None
        notes.append("fusion failed: the data-flow rules were skipped")
    except Exception as e:  # the forward itself fails: that is the first finding
        failed_in = e.module if isinstance(e, _TraceFailed) else ""
        trace_error = e.error if isinstance(e, _TraceFailed) else e
        named = getattr(trace_error, "qatkit_module", None)  # the module that refused
        failed_in = next((n for n, m in work.named_modules() if m is named), failed_in)
        findings.append(_failure_finding(trace_error, failed_in))
        notes.append("the traced forward failed: the data-flow rules were skipped")

    shared_extra: dict[str, Any] = {"doctor": True, "recorded_march": recorded_march,
                                    "state": state, "doctor_stage": stage, "wrapper": wrapper}
    done: set[str] = set()
    for rule_stage in _rule_stages(stage, state, fqs):
        ctx = Context(model=work, stage=rule_stage, march=the_march, graph=graph,
                      example_inputs=example_inputs, qconfigs=qconfigs, processor=processor,
                      input_source=input_source, calibration_inputs=calibration_inputs,
                      history=history, extra=shared_extra)
        for code, r in all_rules().items():
            if code in done or rule_stage not in r.stages:
                continue
            done.add(code)
            try:
                findings.extend(run(ctx, [code]))
            except QatkitError as e:
                findings.append(Finding(e.code, "error", "", e.message, e.fix))
            except Exception as e:  # a bug in a rule must not hide the other findings
                findings.append(Finding(
                    code, "warning", "", f"internal error in rule {code}: "
                    f"{type(e).__name__}: {e} (please report it)", "none: a qatkit bug",
                    user_line_of(e.__traceback__)))
    findings = _dedupe(findings)
    active = [f for f in findings if f.silenced is None]
    silenced = [f for f in findings if f.silenced is not None]
    order = {"error": 0, "warning": 1, "info": 2}
    active.sort(key=lambda f: (order.get(f.severity, 3), f.code))
    return Report(active, silenced, stage, the_march.name if the_march else None, strict,
                  notes, trace_error)


def _failure_finding(e: BaseException, module: str) -> Finding:
    where = user_line_of(e.__traceback__)
    if isinstance(e, QatkitError):
        return Finding(e.code, "error", module, "the forward pass fails: " + e.message,
                       e.fix or "see the message", where)
    return Finding("QK000", "error", module, "the forward pass fails on the example inputs: "
                   f"{type(e).__name__}: {' '.join(str(e).split())}",
                   "make the model run on the example inputs (check their shape and dtype)",
                   where)


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for f in findings:
        key = (f.code, f.module, f.message)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


# ------------------------------------------------------------------------------ command line


def _longest_word(texts: list[str], cap: int) -> int:
    return min(cap, max((len(w) for t in texts for w in t.split()), default=1))


def _wrap_words(text: str, width: int, indent: str) -> str:
    """``text`` wrapped at spaces only (identifiers stay whole), every line indented."""
    import textwrap
    return textwrap.fill(text, width=max(20, width - 1), initial_indent=indent,
                         subsequent_indent=indent + "  ", break_long_words=False,
                         break_on_hyphens=False)
