"""QK001: a qconfig on a module that is not quantized (loss, pre- or post-processing).

Decided by data flow in the traced forward: a module is outside the deploy region when no
QuantStub output reaches it without a DeQuantStub in between. Loss modules are torch loss classes
(``nn.modules.loss._Loss``, found by type even if ``forward`` never calls them) and modules fed
both by the model's output path (downstream of a QuantStub) and by an input that never passed a
QuantStub (the targets).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn as nn

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import qconfigs, region, sources, user_type
from qatkit.quantization import trace as tr


def _downstream_of_quant(g: tr.Graph) -> set[int]:
    """Nodes reached from a QuantStub output, DeQuantStubs included (the model's output path)."""
    from qatkit.fixed_point.modules import QQuantStub
    from qatkit.quantization.stubs import QuantStub
    out: set[int] = set()
    for n in g.nodes:
        if isinstance(n.module, (QuantStub, QQuantStub)) or any(i in out for i in n.inputs):
            out.add(n.index)
    return out


def _skip(module: nn.Module | None) -> bool:
    from qatkit.fixed_point.modules import QDeQuantStub, QQuantStub
    from qatkit.quantization.stubs import DeQuantStub, QuantStub
    return module is None or isinstance(module, (QuantStub, DeQuantStub, QQuantStub,
                                                  QDeQuantStub))


def _check(ctx: Context) -> Iterator[Finding]:
    qc = qconfigs(ctx)
    reported: set[str] = set()
    g = ctx.graph
    if g is not None:
        inside = region(ctx)
        pre = tr.float_nodes_before_quant(g)
        post = _downstream_of_quant(g)
        by_name: dict[str, list[tr.Node]] = {}
        for n in g.nodes:
            if n.kind in ("module", "functional") and not _skip(n.module):
                by_name.setdefault(n.target, []).append(n)
        for name, nodes in by_name.items():
            is_loss = isinstance(nodes[0].module, nn.modules.loss._Loss)
            if qc.get(name) is None or (any(n.index in inside for n in nodes) and not is_loss):
                continue
            kind = user_type(nodes[0].module)
            feeds = [set(n.inputs) for n in nodes]
            if is_loss:
                what = f"is a loss ({kind})"
            elif any(ins & post and ins & pre for ins in feeds):
                what = (f"computes a loss-like value ({kind}) from the model's outputs and an "
                        "input that never passes a QuantStub (the targets)")
            elif all(n.index in pre for n in nodes):
                what = f"is pre-processing ({kind}): it runs before any QuantStub"
            elif all(n.index in post for n in nodes):
                what = f"is post-processing ({kind}): it runs only after a DeQuantStub"
            else:
                what = f"({kind}) is outside the deploy region (no QuantStub output reaches it)"
            reported.add(name)
            yield RULE.finding(name, f"it {what}, yet has a non-None qconfig. It is not part "
                               "of the deployed model: prepare keeps it float, and the qconfig "
                               "only hides what really gets quantized.",
                               fix=_fix(name), source=sources(nodes))
    for name, mod in ctx.model.named_modules():  # loss modules forward never calls
        if name not in reported and isinstance(mod, nn.modules.loss._Loss) and \
                qc.get(name) is not None:
            yield RULE.finding(name, f"it is a loss ({type(mod).__name__}), yet has a "
                               "non-None qconfig; losses are never deployed and stay float.",
                               fix=_fix(name))


def _fix(name: str) -> str:
    path = f"model.{name}" if name else "model"
    return (f"set {path}.qconfig = None before prepare (or "
            f"QConfigMapping(...).set_module_name({name!r}, None)); give qconfigs only to "
            "modules between QuantStub and DeQuantStub")


RULE = Rule(
    code="QK001",
    name="qconfig-outside-region",
    severity="warning",
    stages=("float", "prepare"),
    summary=(
        "Finds modules that have a non-None qconfig but are not quantized: loss modules "
        "(torch loss classes, and modules that compute a loss from the model's outputs and "
        "targets) and modules outside the deploy region, i.e. reached by data before any "
        "QuantStub (pre-processing) or only after a DeQuantStub (post-processing). The deploy "
        "region is read off a traced forward (data flow), not guessed from names."),
    why=(
        "Only the modules between QuantStub and DeQuantStub run on the BPU. A qconfig on a "
        "loss or on pre/post-processing says the module is quantized when it is not: prepare "
        "keeps it float, so the qconfig table no longer shows what is deployed, and moving the "
        "stubs later silently changes what gets quantized."),
    bad="""
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv, self.fc = nn.Conv2d(1, 8, 3), nn.Linear(8 * 6 * 6, 10)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x, target):
        out = self.dequant(self.fc(self.conv(self.quant(x)).flatten(1)))
        return out, self.loss(out, target)


model = Net()
model.qconfig = qk.default_qat_qconfig()    # inherited by model.loss too
qat = qk.prepare(model, (x, y))             # [QK001] module 'loss': it is a loss ...
""",
    good="""
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv, self.fc = nn.Conv2d(1, 8, 3), nn.Linear(8 * 6 * 6, 10)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x, target):
        out = self.dequant(self.fc(self.conv(self.quant(x)).flatten(1)))
        return out, self.loss(out, target)


model = Net()
model.qconfig = qk.default_qat_qconfig()
model.loss.qconfig = None                   # not quantized: say so
qat = qk.prepare(model, (x, y))
""",
    fix=("set qconfig = None on losses and on modules before the QuantStub or after the "
         "DeQuantStub; give qconfigs only to modules that are quantized"),
    check=_check,
)
