"""QK100: conv+bn(+relu), conv+relu, linear+relu and add+relu left unfused.

Found by data flow (looking through the Identity modules fusion leaves behind): a conv whose
only consumer is a BatchNorm2d, a conv/linear without a fused activation whose only consumer
is a ReLU/ReLU6 (module or ``F.relu``), a FloatFunctional add followed by a ReLU. Fusion also
takes a ReLU module called at several places and a functional ReLU (they are applied twice,
which changes nothing), so after ``prepare(fuse=True)`` such a pattern remains only in forms
fuse does not handle; with ``fuse=False`` every pattern remains.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn as nn

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import n_calls, region
from qatkit.quantization import trace as tr
from qatkit.quantization.registry import op_kind

_ACTS = (nn.ReLU, nn.ReLU6)


def _why_not(g: tr.Graph, *nodes: tr.Node) -> str:
    shared = [f"'{n.target}' is called {n_calls(g, n.target)} times" for n in nodes
              if n.kind == "module" and n_calls(g, n.target) > 1]
    if shared:
        return " (" + "; ".join(shared) + ": fusion needs one module per call site)"
    return " (prepare with fuse=False, or a form fuse does not handle)"


def _is_act(node: tr.Node) -> bool:
    if node.kind == "module":
        return type(node.module) in _ACTS
    return node.kind == "function" and node.op in ("relu", "relu_", "relu6")


def _next(g: tr.Graph, node: tr.Node) -> tr.Node | None:
    """The only consumer of ``node``'s output, looking through the Identity modules that
    fusion leaves where it folded a BN or ReLU."""
    while True:
        users = g.consumers(node)
        if len(users) != 1 or node.is_output:
            return None
        nxt = users[0]
        if nxt.kind == "module" and type(nxt.module) is nn.Identity:
            node = nxt
            continue
        return nxt


def _act_name(n: tr.Node) -> str:
    return f"{n.op} '{n.target}'" if n.kind == "module" else f"function {n.op}() at {n.source}"


def _act_hint(g: tr.Graph, *chain: tr.Node) -> str:
    if chain[-1].kind == "function":
        return " (a functional relu cannot be fused: use an nn.ReLU module)"
    return _why_not(g, *chain)


def _check(ctx: Context) -> Iterator[Finding]:
    g = ctx.graph
    if g is None:
        return
    reg = region(ctx)
    seen: set[str] = set()
    for node in g.nodes:
        if node.index not in reg or node.target in seen or node.module is None:
            continue
        if node.kind == "functional" and node.op == "add" and getattr(
                node.module, "fused_activation", None) is None:
            nxt = _next(g, node)
            if nxt is not None and _is_act(nxt) and nxt.op in ("ReLU", "relu", "relu_"):
                seen.add(node.target)
                yield RULE.finding(
                    node.target,
                    f"add '{node.target}' -> {_act_name(nxt)} is not fused"
                    f"{_act_hint(g, nxt)}: the sum is quantized with a signed range of which "
                    "the ReLU then throws away the negative half (1 bit of int8 lost).",
                    fix=f"call self.{node.target.rsplit('.', 1)[-1]}.add_relu(a, b) instead of "
                        "add followed by a ReLU", source=node.source)
            continue
        kind = op_kind(node.module)
        if node.kind != "module" or kind not in ("conv2d", "linear"):
            continue
        nxt = _next(g, node)
        if nxt is None:
            continue
        if kind == "conv2d" and nxt.kind == "module" and type(nxt.module) is nn.BatchNorm2d:
            chain, names = [node, nxt], f"'{node.target}' -> BatchNorm2d '{nxt.target}'"
            after = _next(g, nxt)
            if after is not None and _is_act(after):
                chain.append(after)
                names += f" -> {_act_name(after)}"
            seen.add(node.target)
            yield RULE.finding(
                node.target,
                f"{names} is not fused{_why_not(g, *chain)}: the BN stays a separate float "
                "op, so the conv's output is quantized before the BN instead of once after it.",
                fix="prepare with fuse=True (the default), with one BN (and ReLU) module per "
                    "call site", source=node.source)
        elif _is_act(nxt) and getattr(node.module, "activation", None) is None and \
                not getattr(node.module, "feeds_add", False):
            seen.add(node.target)
            yield RULE.finding(
                node.target,
                f"'{node.target}' -> {_act_name(nxt)} is not fused{_act_hint(g, node, nxt)}: "
                f"the {kind} output is quantized with a signed range of which the ReLU then "
                "throws away the negative half (1 bit of int8 lost).",
                fix="prepare with fuse=True (the default), which fuses it", source=node.source)


RULE = Rule(
    code="QK100",
    name="unfused conv/bn/relu",
    severity="warning",
    stages=("prepare", "calibration", "qat", "validation"),
    summary="Finds conv -> BatchNorm2d (-> ReLU), conv -> ReLU/ReLU6, linear -> ReLU and "
            "FloatFunctional add -> ReLU patterns that are not fused, by data flow in a traced "
            "forward: in a model being prepared with fuse=False, or in a prepared/QAT model.",
    why="Unfused, each op is quantized separately: the conv output is rounded to int8 before "
        "the BN rescales it (and an unfolded BN has no fixed-point form), and a ReLU after a "
        "quantized conv wastes the negative half of the int8 range. Fused, the BN is folded "
        "into the weights and the ReLU clamps the accumulator, so one rounding happens.",
    bad="""
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.conv1(self.quant(x)))
        return self.dequant(self.relu(self.conv2(x)))


calib = qk.prepare(Block().eval(), x, qconfig=qk.default_calibration_qconfig(), fuse=False)
# [QK100] module 'conv1': 'conv1' -> ReLU 'relu' is not fused ...
""",
    good="""
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()                   # shared and F.relu fuse too

    def forward(self, x):
        x = self.relu(self.conv1(self.quant(x)))
        return self.dequant(self.relu(self.conv2(x)))


calib = qk.prepare(Block().eval(), x, qconfig=qk.default_calibration_qconfig())  # fuses
qk.calibrate(calib, train_batches[:8])
quantized = qk.convert(calib)
""",
    fix="prepare with fuse=True (the default); ReLU modules (shared or not), F.relu and "
        "FloatFunctional.add_relu all fuse",
    check=_check,
)
