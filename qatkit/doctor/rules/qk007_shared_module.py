"""QK007: one FloatFunctional (or other module with its own output observer) called several
times in one forward. Counted on the traced forward; every call site is listed."""

from __future__ import annotations

from collections.abc import Iterator

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import has_own_output, region
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
        kind = type(nodes[0].module).__name__
        ops = sorted({n.op for n in nodes}) if nodes[0].kind == "functional" else []
        what = f"{kind}{' (' + ', '.join(ops) + ')' if ops else ''}"
        sites = [n.source or f"call {n.call + 1}" for n in nodes]
        yield RULE.finding(
            name,
            f"{what} is called {len(nodes)} times in one forward, at {'; '.join(sites)}. It "
            "owns one output observer and, after convert, one output scale: every call site "
            "shares statistics and a scale fitted to the mix of their distributions (and "
            "fusion cannot treat the calls separately).",
            fix=f"create one instance per call site (e.g. self.{name.rpartition('.')[2]}1 = "
                f"{_ctor(kind)}, self.{name.rpartition('.')[2]}2 = ...); to share weights, "
                "tie the parameters of two modules instead of calling one twice",
            source=", ".join(n.source for n in nodes if n.source))


def _ctor(kind: str) -> str:
    return "qk.FloatFunctional()" if kind == "FloatFunctional" else f"{kind}(...)"


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
    bad='''
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.add = qk.FloatFunctional()

    def forward(self, x):
        x = self.add.add(x, self.conv1(x))
        return self.add.add(x, self.conv2(x))   # [QK007] FloatFunctional 'add' is called 2 times
''',
    good='''
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.add1, self.add2 = qk.FloatFunctional(), qk.FloatFunctional()

    def forward(self, x):
        x = self.add1.add(x, self.conv1(x))
        return self.add2.add(x, self.conv2(x))
''',
    fix="use one FloatFunctional (and one stub/op module) per call site",
    check=_check,
)
