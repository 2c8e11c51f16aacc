"""QK006: accuracy evaluated/monitored on the fake-quant (QAT) model, never in fixed point.

Judged on the workflow's events (``model_forward`` and ``fixed_point_forward`` of
``qatkit.base.hooks``), per prepared model and its lineage (the fixed-point models converted
from it, ``qatkit.quantization.forwards.lineage``):

* an *evaluation* is a forward of the prepared model in ``eval()`` mode with its fake quants
  in QAT or VALIDATION state (``model.eval()`` alone during QAT, or eval + VALIDATION: both
  are normal ways to evaluate; calibration forwards are not evaluations);
* an *epoch* ends when a training forward (``train()`` mode) follows evaluations: the
  train() -> eval() -> train() rhythm of a training loop;
* an epoch in which the QAT model was evaluated and no fixed-point model of its lineage ran is
  a fake-quant-only evaluation. At the first evaluation after such an epoch the rule warns,
  once per model: the loop monitors the wrong model.
* A model that is never trained (a calibrated model) has no epochs: it warns past
  :data:`MAX_FAKE_QUANT_BATCHES` evaluation batches since the last fixed-point forward of its
  lineage (a sanity check of a few batches is fine).

Evaluating the fixed-point model of *another* model, or once long ago (a smoke-test convert
before training), does not silence the rule for this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch.nn as nn

from qatkit.doctor.rules import Context, Finding, Rule

# A calibrated model with no training loop: 20 batches is a small validation set (~1-5k
# images); past that, accuracy is being measured on the wrong model.
MAX_FAKE_QUANT_BATCHES = 20


@dataclass
class Lineage:
    """What happened to one prepared model (and its fixed-point copies)."""

    trained: bool = False  # a train-mode forward was seen
    evaluating: bool = False  # the last forward was an evaluation
    epoch: int = 0  # epochs closed so far
    eval_batches: int = 0  # evaluations in the current epoch
    fixed_point_batches: int = 0  # fixed-point forwards in the current epoch
    since_fixed_point: int = 0  # evaluations since the last fixed-point forward
    qat_only_epochs: int = 0  # closed epochs with evaluations and no fixed point
    fixed_point_total: int = 0
    warned: bool = False


_lineages: dict[int, Lineage] = {}


def reset() -> None:
    """Forget every model's history (tests, long-lived notebooks)."""
    _lineages.clear()


def lineage_state(key: int) -> Lineage:
    return _lineages.setdefault(key, Lineage())


def fixed_point_evaluated(key: int | None = None) -> bool:
    """True once a fixed-point model (of lineage ``key``, or of any) has run."""
    if key is not None:
        return key in _lineages and _lineages[key].fixed_point_total > 0
    return any(s.fixed_point_total > 0 for s in _lineages.values())


def note_fixed_point_forward(key: int | None) -> None:
    """One forward of a fixed-point model of lineage ``key``."""
    if key is None:
        return
    s = lineage_state(key)
    s.fixed_point_batches += 1
    s.fixed_point_total += 1
    s.since_fixed_point = 0


def note_forward(model: nn.Module, key: int | None, training: bool, state_name: str
                 ) -> Context | None:
    """One forward of a prepared model; a Context for the rule when it should judge."""
    if key is None or state_name == "CALIBRATION":
        return None
    s = lineage_state(key)
    if training:
        if s.evaluating:  # train() after evaluations: the epoch ends
            if s.eval_batches and not s.fixed_point_batches:
                s.qat_only_epochs += 1
            s.epoch += 1
            s.eval_batches = s.fixed_point_batches = 0
        s.trained, s.evaluating = True, False
        return None
    s.evaluating = True
    s.eval_batches += 1
    s.since_fixed_point += 1
    if s.warned:
        return None
    if s.qat_only_epochs or (not s.trained and s.since_fixed_point > MAX_FAKE_QUANT_BATCHES):
        return Context(model=model, stage="validation",
                       extra={"lineage": s, "state": state_name})
    return None


def _check(ctx: Context) -> Iterator[Finding]:
    s: Lineage | None = ctx.extra.get("lineage")
    if s is None or s.warned:
        return
    s.warned = True
    if s.qat_only_epochs:
        n = s.qat_only_epochs
        what = (f"in {n} of the {s.epoch} epoch(s) so far this QAT model was evaluated "
                "(eval-mode forwards) and no fixed-point model converted from it ran in the "
                "same epoch")
    else:
        what = (f"this calibrated model has run {s.since_fixed_point} evaluation batches and "
                "no fixed-point model converted from it has run since")
    yield RULE.finding("", f"{what}: accuracy is being measured on the fake-quant model, which "
                       "cannot reproduce the integer requantization, saturation and lookup "
                       "tables of the deployed model, so a deployment accuracy drop would go "
                       "unnoticed. (Evaluating in eval() mode is right; evaluate the "
                       "fixed-point model too.)")


RULE = Rule(
    code="QK006",
    name="qat-evaluation",
    severity="warning",
    stages=("validation",),
    summary=(
        "Warns (once per model) when a QAT model is evaluated (eval-mode forwards in QAT or "
        "VALIDATION state) in a training epoch in which no fixed-point model converted from "
        "it ran, i.e. when accuracy is evaluated or monitored on the fake-quant model only; "
        "for a calibrated model that is never trained, past "
        f"{MAX_FAKE_QUANT_BATCHES} evaluation batches without a fixed-point forward. "
        "model.eval() during QAT is normal and never an error. The fix is qk.evaluate "
        "(converts a copy and evaluates the fixed-point model) or "
        "qk.FixedPointMonitor (per epoch, both models and their gap)."),
    why=(
        "QAT is float arithmetic with fake-quant nodes; the deployed model adds integer "
        "requantization, saturation, different rounding and lookup tables. The two can "
        "differ by whole accuracy points, and only the fixed-point model predicts what the "
        "board will do. Monitoring the QAT model hides such gaps until deployment."),
    bad="""
qat = qk.prepare(Net(), x, qconfig=qk.default_qat_qconfig())
qk.calibrate(qat, train_batches[:8])
qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
opt = torch.optim.Adam(qat.parameters(), 1e-3)
for epoch in range(2):
    train_one_epoch(qat, opt)
    acc = accuracy(qat)     # [QK006] (epoch 2) ... evaluated and no fixed-point model ... ran
""",
    good="""
qat = qk.prepare(Net(), x, qconfig=qk.default_qat_qconfig())
qk.calibrate(qat, train_batches[:8])
qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
opt = torch.optim.Adam(qat.parameters(), 1e-3)
monitor = qk.FixedPointMonitor(val_batches)   # a list or DataLoader of (x, y)
for epoch in range(2):
    train_one_epoch(qat, opt)
    rec = monitor.step(qat)                   # converts a copy; fake-quant vs fixed point
    print(epoch, rec.fake_quant, rec.fixed_point, rec.gap)
final_acc = qk.evaluate(qat, val_batches)     # the fixed-point model's accuracy
""",
    fix="evaluate the fixed-point model: qk.evaluate(model, batches) converts a copy and "
        "evaluates it; qk.FixedPointMonitor(batches).step(model) each epoch records the "
        "QAT-vs-fixed-point gap",
    check=_check,
)
