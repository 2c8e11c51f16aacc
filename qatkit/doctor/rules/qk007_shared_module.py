"""QK007: one FloatFunctional (or other module with its own output observer) called several
times in one forward. Counted on the traced forward; every call site is listed."""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import has_own_output, region, user_type
from qatkit.quantization import trace as tr


def _check(ctx: Context) -> Iterator[Finding]:
    g = ctx.graph
    if g is None:
        return
    inside = region(ctx)
    calls: dict[str, list[tr.Node]] = {}
    for n in g.nodes:
        if n.kind in ("module", "functional") and has_own_output(n.module):
            calls.setdefault(n.target, []).append(n)
    for name, nodes in calls.items():
        if len(nodes) < 2 or not any(n.index in inside for n in nodes):
            continue
        kind = user_type(nodes[0].module)
        ops = sorted({n.op for n in nodes}) if nodes[0].kind == "functional" else []
        what = f"{kind}{' (' + ', '.join(ops) + ')' if ops else ''}"
        sites = [n.source or f"call {n.call + 1}" for n in nodes]
        if len(set(sites)) < len(sites):  # a loop or a helper method: name the calling lines
            chains = _call_chains(ctx, nodes[0].module, len(nodes))
            if chains:
                sites = chains
        where = _sites(sites)
        base = _identifier(name)
        yield RULE.finding(
            name,
            f"{what} is called {len(nodes)} times in one forward, {where}. It "
            "owns one output observer and, after convert, one output scale: every call site "
            "shares statistics and a scale fitted to the mix of their distributions (and "
            "fusion cannot treat the calls separately).",
            fix=f"create one instance per call site (e.g. self.{base}1 = {_ctor(kind)}, "
                f"self.{base}2 = ...; in a loop, an nn.ModuleList with one per iteration: "
                f"self.{base}s = nn.ModuleList({_ctor(kind)} for _ in range(n)) and "
                f"self.{base}s[i]); to share weights, tie the parameters of two modules "
                "instead of calling one twice",
            source=", ".join(dict.fromkeys(n.source for n in nodes if n.source)))


def _sites(sites: list[str]) -> str:
    distinct = list(dict.fromkeys(sites))
    if len(distinct) == 1:
        return f"every time from {distinct[0]} (a loop)"
    counts = {s: sites.count(s) for s in distinct}
    return "at " + "; ".join(s + (f" ({counts[s]} times, a loop)" if counts[s] > 1 else "")
                             for s in distinct)


def _identifier(name: str) -> str:
    """A valid attribute name to suggest for module ``name`` (``'blocks.0.add'`` -> ``add``,
    ``'adds.0'`` -> ``adds_``)."""
    for part in reversed(name.split(".")):
        if part.isidentifier():
            return part
    return "op"


def _call_chains(ctx: Context, module: object, expected: int) -> list[str] | None:
    """The user call chain of each call of ``module`` (``forward m.py:40 -> block m.py:30``),
    from one more forward of the model. Only on the float model (the doctor's copy or
    prepare's): forwards there change nothing; fake-quant models would update observers."""
    import torch

    from qatkit.base.frames import is_library_file
    from qatkit.quantization.stubs import FloatFunctional
    if ctx.stage not in ("float", "prepare") or ctx.example_inputs is None or \
            not isinstance(module, torch.nn.Module):
        return None
    chains: list[str] = []

    def grab() -> None:
        stack = traceback.extract_stack()[:-2]
        run: list[str] = []
        for fr in reversed(stack):  # the innermost contiguous user frames
            if is_library_file(fr.filename):
                if run:
                    break
                continue
            run.append(f"{fr.name} {os.path.basename(fr.filename)}:{fr.lineno}")
        chains.append(" -> ".join(reversed(run)))

    handle = None
    if isinstance(module, FloatFunctional):
        original = module._call

        def spy(*a: object, **k: object) -> object:
            grab()
            return original(*a, **k)
        module._call = spy  # type: ignore[method-assign]
    else:
        handle = module.register_forward_pre_hook(lambda m, a: grab())
    model = ctx.model
    was = {m: m.training for m in model.modules()}
    try:
        model.eval()
        x = ctx.example_inputs
        with torch.no_grad():
            model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) \
                else model(x)
    except Exception:
        return None
    finally:
        if handle is not None:
            handle.remove()
        else:
            del module._call
        for m, t in was.items():
            m.training = t
    return chains if len(chains) == expected and all(chains) else None


def _ctor(kind: str) -> str:
    return "qk.FloatFunctional()" if kind == "FloatFunctional" else f"nn.{kind}(...)"


RULE = Rule(
    code="QK007",
    name="shared-module",
    severity="error",
    stages=("float", "prepare", "calibration", "qat", "validation", "converted"),
    summary=(
        "Finds a FloatFunctional, or any other module with its own output observer (QuantStub, "
        "conv/linear, ReLU6/pooling/sigmoid-like ops...), called more than once in one forward "
        "inside the deploy region, and lists every call site. DeQuantStub, Identity and "
        "pass-through ops (ReLU, max pooling, flatten, dropout) are excluded: they have no "
        "output scale of their own."),
    why=(
        "One instance owns one output observer and, once converted, one output scale. Called at "
        "two places, its observer sees two distributions and the quantized model forces one "
        "scale on both: the smaller-range site loses precision, the larger one may saturate. "
        "Fusion (conv+add+relu) also assumes one call site per module."),
    bad="""
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv1, self.conv2 = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)
        self.add = qk.FloatFunctional()

    def forward(self, x):
        x = self.quant(x)
        x = self.add.add(x, self.conv1(x))
        return self.dequant(self.add.add(x, self.conv2(x)))   # 'add' called a second time


calib = qk.prepare(Residual(), x, qconfig=qk.default_calibration_qconfig())
# [QK007] FloatFunctional 'add' is called 2 times in one forward ...
""",
    good="""
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv1, self.conv2 = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)
        self.add1, self.add2 = qk.FloatFunctional(), qk.FloatFunctional()   # one per call

    def forward(self, x):
        x = self.quant(x)
        x = self.add1.add(x, self.conv1(x))
        return self.dequant(self.add2.add(x, self.conv2(x)))


calib = qk.prepare(Residual(), x, qconfig=qk.default_calibration_qconfig())
qk.calibrate(calib, train_batches[:8])
quantized = qk.convert(calib)
""",
    fix="use one FloatFunctional (and one stub/op module) per call site",
    check=_check,
)
