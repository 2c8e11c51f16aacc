"""The doctor's rules: one file per rule, each with its code, detection, message, fix and docs.

A rule is a :class:`Rule` whose ``check`` yields :class:`Finding` objects for a
:class:`Context` (the model, its data-flow graph, the march, the stage...). The same rules run
in two ways: as guards inside the workflow (``qatkit.doctor.guards``: errors raise, warnings warn)
and all together in ``qk.doctor.check``. Adding a rule means adding one file here (listed in
``RULE_MODULES``) and its tests.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from qatkit.base.march import March

SEVERITIES = ("error", "warning", "info")
STAGES = ("float", "prepare", "calibration", "qat", "validation", "convert", "converted",
          "evaluate")


# Every rule's ``bad`` and ``good`` example is a complete program that runs as written after this
# preamble (imports, the march, real data, a small model, two training helpers);
# tests/test_rule_examples.py runs each one. The findings of a program are the QatkitError it
# raises, the QatkitWarnings it issues and, when it assigns ``report = qk.doctor.check(...)``,
# that report's findings: ``bad`` must get findings of its rule's code only, ``good`` none.
EXAMPLE_PREAMBLE = """
import torch
import torch.nn as nn
import torch.nn.functional as F

import qatkit as qk
from qatkit.demo.data import load_digits

qk.set_march("nash-e")
torch.manual_seed(0)              # the examples are deterministic
digits = load_digits()            # real 8x8 digits: images (N, 1, 8, 8) in [0, 1], labels
train_batches = list(zip(digits.x_train.split(64), digits.y_train.split(64)))
val_batches = list(zip(digits.x_test.split(64), digits.y_test.split(64)))
x, y = train_batches[0]           # example inputs (64 images) and their labels


class Net(nn.Module):  # a small classifier of 8x8 images; input_scale=1/128: camera input
    def __init__(self, channels=1, input_scale=None):
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(input_scale), qk.DeQuantStub()
        self.conv, self.relu = nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU()
        self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.conv(self.quant(x))))
        return self.dequant(self.fc(x.flatten(1)))


def train_one_epoch(model, opt, batches=train_batches):
    # one epoch of cross-entropy training; returns the mean loss
    model.train()
    total = 0.0
    for xb, yb in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        total += loss.item() * len(yb)
    return total / sum(len(yb) for _, yb in batches)


@torch.no_grad()
def accuracy(model, batches=val_batches):
    # top-1 accuracy, in eval mode
    model.eval()
    right = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in batches)
    return right / sum(len(yb) for _, yb in batches)
"""
EXAMPLES_NOTE = ("Both examples are complete programs: each runs as written after the "
                 "[shared preamble](README.md#examples), and the test suite runs them "
                 "(`tests/test_rule_examples.py`): the first gets this rule's finding, the "
                 "second none.")


@dataclass
class Finding:
    code: str
    severity: str
    module: str  # qualified name ("" for the whole model)
    message: str
    fix: str
    source: str = ""  # file:line of the call site, when known
    silenced: str | None = None  # the reason, when the user silenced it

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "module": self.module,
                "message": self.message, "fix": self.fix, "source": self.source,
                "silenced": self.silenced}

    def __str__(self) -> str:
        where = self.module + (f" ({self.source})" if self.source else "")
        return f"[{self.code}] {where}: {self.message} Fix: {self.fix}"


@dataclass
class Context:
    """What a rule may look at. Fields a stage does not have are None."""

    model: nn.Module
    stage: str
    march: March | None = None
    graph: Any = None  # qatkit.quantization.trace.Graph
    example_inputs: Any = None
    qconfigs: dict[str, Any] | None = None  # effective qconfig per module name (float stage)
    processor: str | None = None  # declared target processor
    input_source: str | None = None  # "camera" (centered YUV444) or "other"
    calibration_inputs: Any = None  # a batch as fed to the model, for input checks
    history: dict[str, list[float]] | None = None  # train/val metrics per epoch (QK009)
    extra: dict[str, Any] = field(default_factory=dict)

    def module(self, name: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(name) if name else self.model
        except AttributeError:
            return None


@dataclass
class Rule:
    code: str
    name: str
    severity: str
    stages: tuple[str, ...]
    summary: str  # what it does
    why: str  # why it is bad
    bad: str  # a program (after EXAMPLE_PREAMBLE) that gets this rule's finding
    good: str  # the correct practice: a program that gets no finding
    fix: str
    check: Callable[[Context], Iterable[Finding]] = field(repr=False, default=lambda c: ())

    def finding(self, module: str, message: str, fix: str | None = None, source: str = "",
                severity: str | None = None) -> Finding:
        return Finding(self.code, severity or self.severity, module, message, fix or self.fix,
                       source)

    def docs(self) -> str:
        return (f"# {self.code}: {self.name}\n\nSeverity: **{self.severity}**. Stages: "
                f"{', '.join(self.stages)}.\n\n## What it does\n\n{self.summary}\n\n"
                f"## Why is this bad?\n\n{self.why}\n\n## Example\n\n{EXAMPLES_NOTE}\n\n"
                "```python\n"
                f"{self.bad.strip()}\n```\n\n## Use instead\n\n```python\n{self.good.strip()}"
                f"\n```\n\nFix: {self.fix}\n")


RULE_MODULES = (
    "qk001_qconfig_outside_region", "qk002_march", "qk003_high_precision_output",
    "qk004_multi_device_calibration", "qk005_centered_yuv_input", "qk006_qat_evaluation",
    "qk007_shared_module", "qk008_uncalibrated_op", "qk009_overfitting",
    "qk100_unfused", "qk101_unused_module", "qk102_float_into_quantized",
    "qk103_nonfinite_statistics", "qk104_scale_imbalance", "qk105_range",
    "qk106_unsupported_op",
)
_registry: dict[str, Rule] | None = None


def all_rules() -> dict[str, Rule]:
    global _registry
    if _registry is None:
        _registry = {}
        for name in RULE_MODULES:
            try:
                mod = importlib.import_module(f"qatkit.doctor.rules.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"qatkit.doctor.rules.{name}":
                    raise
                continue
            _registry[mod.RULE.code] = mod.RULE
    return _registry


def rule(code: str) -> Rule:
    return all_rules()[code]


def run(ctx: Context, codes: Iterable[str] | None = None) -> Iterator[Finding]:
    """Findings of every rule that applies at ``ctx.stage`` (silenced ones marked)."""
    from qatkit.base.errors import silenced_reason
    for r in all_rules().values():
        if codes is not None and r.code not in codes:
            continue
        if ctx.stage not in r.stages:
            continue
        for f in r.check(ctx):
            f.silenced = silenced_reason(ctx.module(f.module), f.code)
            yield f
