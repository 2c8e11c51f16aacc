"""QK101: modules with parameters, stubs or FloatFunctionals that the forward never calls."""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn as nn

from qatkit.doctor.rules import Context, Finding, Rule
from qatkit.doctor.rules.common import is_marker
from qatkit.quantization import trace as tr
from qatkit.quantization.call_sites import OPS_NAME
from qatkit.quantization.fake_quant import FakeQuantize
from qatkit.quantization.meta import META_NAME
from qatkit.quantization.observers import Observer


def _weighted(mod: nn.Module) -> bool:
    from qatkit.fixed_point.modules import QModule
    if next(mod.parameters(recurse=False), None) is not None:
        return True
    return isinstance(mod, QModule) and getattr(mod, "weight", None) is not None


def _library_spare(model: nn.Module, name: str, mod: nn.Module) -> bool:
    """A parameterless stub/FloatFunctional that a library's block always creates and calls
    only in some configurations (torchvision.models.quantization's ``skip_add`` in inverted
    residuals without a residual connection): the user cannot remove it, and having no
    parameters and no calls it changes nothing in the deployed model."""
    if next(mod.parameters(), None) is not None or not is_marker(mod):
        return False
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return type(parent).__module__.split(".")[0] in _LIBRARIES


_LIBRARIES = frozenset({"torchvision", "timm"})


def _reached_in_training(ctx: Context, names: list[str]) -> set[str]:
    """Which of ``names`` a train()-mode forward reaches (auxiliary heads such as googlenet's
    and inception's, which eval() skips): those are no dead code. One extra traced forward,
    only when there are candidates and example inputs; the model's state is restored."""
    if not names or ctx.example_inputs is None:
        return set()
    try:
        called = tr.trace(ctx.model, ctx.example_inputs, training=True).called_names()
    except Exception:
        return set()
    return {n for n in names if any(c == n or c.startswith(n + ".") for c in called)}


def _check(ctx: Context) -> Iterator[Finding]:
    g = ctx.graph
    if g is None:
        return
    called = g.called_names()
    prefixes = tuple(c + "." for c in called if c)
    above = {c.rsplit(".", k)[0] for c in called for k in range(1, c.count(".") + 1)}

    def unused(name: str) -> bool:  # neither called, inside a called leaf, nor above one
        return name not in called and name not in above and not name.startswith(prefixes)

    skip: list[str] = []  # subtrees that are machinery, not model code
    roots: dict[str, None] = {}
    for name, mod in ctx.model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if name in (META_NAME, OPS_NAME) or isinstance(mod, (FakeQuantize, Observer)):
            skip.append(name)
            continue
        if not (_weighted(mod) or is_marker(mod)) or not unused(name):
            continue
        # Report the largest unused subtree once (an unused head, not each of its layers).
        root = name
        while "." in root and unused(root.rsplit(".", 1)[0]):
            root = root.rsplit(".", 1)[0]
        roots[root] = None
    training = _reached_in_training(ctx, list(roots))
    for name in roots:
        mod = ctx.model.get_submodule(name)
        if _library_spare(ctx.model, name, mod) or name in training:
            continue
        n_params = sum(p.numel() for p in mod.parameters())
        size = f" with {n_params:,} parameters" if n_params else ""
        yield RULE.finding(
            name,
            f"{type(mod).__name__} '{name}'{size} is never called in the traced forward (eval "
            "mode, on the example inputs), nor in train() mode. It stays float: it gets no "
            "statistics and no fixed-point form, and the fixed-point model refuses it if a "
            "later input takes that branch. Dead code still costs memory.",
            fix="pass example inputs (and calibration batches) that take this branch, or "
                "remove the module; if it is used only through another method, silence this "
                "finding for it")


RULE = Rule(
    code="QK101",
    name="module never called",
    severity="warning",
    stages=("float", "prepare", "calibration", "qat", "validation", "converted"),
    summary="Lists modules that own parameters, and QuantStubs, DeQuantStubs and "
            "FloatFunctionals, that are never called in a traced (eval-mode) forward. "
            "qatkit_meta, fake quants and observers are not counted.",
    why="An unused FloatFunctional or stub usually means the forward does something other "
        "than what the author intended: e.g. a residual add that was dropped, or a "
        "QuantStub that is bypassed. Its observer never sees data, so it has no scale. "
        "Unused layers also waste memory and checkpoint size.",
    bad="""
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.skip_add = qk.FloatFunctional()

    def forward(self, x):
        x = self.conv1(self.quant(x))
        return self.dequant(self.conv2(x))          # the residual skip_add was dropped


report = qk.doctor.check(Net(), x)
# [QK101] FloatFunctional 'skip_add' is never called in the traced forward ...
""",
    good="""
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.skip_add = qk.FloatFunctional()

    def forward(self, x):
        x = self.conv1(self.quant(x))
        return self.dequant(self.skip_add.add(self.conv2(x), x))


report = qk.doctor.check(Net(), x)
""",
    fix="call the module in forward, delete it, or qk.silence(module, 'QK101', reason) when "
        "it is used only in training",
    check=_check,
)
