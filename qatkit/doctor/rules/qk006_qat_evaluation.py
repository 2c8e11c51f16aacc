"""QK006: accuracy evaluated/monitored on the fake-quant (QAT) model only.

The primary input QuantStub of a prepared model counts its forwards in VALIDATION state (a
hook set by ``guards.attach_runtime``; one integer add per batch). Past
:data:`MAX_FAKE_QUANT_BATCHES` with no fixed-point forward anywhere in the process
(:func:`fixed_point_evaluated`, counted by the doctor's hook on converted models), the rule warns,
once per process.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn as nn

from qatkit.doctor.rules import Context, Finding, Rule

# A sanity check of a calibrated model on a few batches is fine; an evaluation loop (or one
# per epoch) is not. 20 batches is a small validation set (~1-5k images) or ~4 epochs of a
# 5-batch monitor: past that, accuracy is being measured on the wrong model.
MAX_FAKE_QUANT_BATCHES = 20
_warned = False
_fixed_point_forwards = 0


def note_fixed_point_forward() -> None:
    """Record one forward of a converted (fixed-point) model."""
    global _fixed_point_forwards
    _fixed_point_forwards += 1


def fixed_point_evaluated() -> bool:
    """True once a fixed-point model has run in this process."""
    return _fixed_point_forwards > 0


def reset() -> None:
    """Forget the warning and every fixed-point evaluation (tests, long-lived notebooks)."""
    global _warned, _fixed_point_forwards
    _warned = False
    _fixed_point_forwards = 0


def count_validation_batch(stub: nn.Module) -> int | None:
    """Count one VALIDATION forward at ``stub``; the count when the rule should look."""
    n = stub.__dict__.get("_qatkit_validation_batches", 0) + 1
    stub.__dict__["_qatkit_validation_batches"] = n
    return n if n > MAX_FAKE_QUANT_BATCHES and not _warned else None


def _check(ctx: Context) -> Iterator[Finding]:
    global _warned
    n = ctx.extra.get("validation_batches")
    if n is None or n <= MAX_FAKE_QUANT_BATCHES or _warned:
        return
    if fixed_point_evaluated():
        return
    _warned = True
    yield RULE.finding("", f"the fake-quant model has run {n} batches in VALIDATION state and "
                       "no fixed-point (converted) model has been evaluated in this process: "
                       "accuracy is being measured on the QAT model, which cannot reproduce "
                       "the integer requantization, saturation and lookup tables of the "
                       "deployed model, so a deployment accuracy drop would go unnoticed.")


RULE = Rule(
    code="QK006",
    name="qat-evaluation",
    severity="warning",
    stages=("validation",),
    summary=(
        "Warns (once per process) when a fake-quant model runs more than "
        f"{MAX_FAKE_QUANT_BATCHES} batches in VALIDATION state while no fixed-point model has "
        "been evaluated in the process, i.e. when accuracy is evaluated or monitored on the "
        "QAT model. The fix is qk.evaluate (converts a copy and evaluates the fixed-point "
        "model) or qk.FixedPointMonitor (per epoch, both models and their gap)."),
    why=(
        "QAT is float arithmetic with fake-quant nodes; the deployed model adds integer "
        "requantization, saturation, different rounding and lookup tables. The two can "
        "differ by whole accuracy points, and only the fixed-point model predicts what the "
        "board will do. Monitoring the QAT model hides such gaps until deployment."),
    bad='''
for epoch in range(epochs):
    train_one_epoch(qat)
    qat.eval(); qk.set_fake_quantize(qat, qk.FakeQuantState.VALIDATION)
    acc = accuracy(qat, val_loader)           # [QK006] the fake-quant model ...
    qat.train(); qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
''',
    good='''
monitor = qk.FixedPointMonitor(val_batches)   # a list or DataLoader of (x, y)
for epoch in range(epochs):
    train_one_epoch(qat)
    rec = monitor.step(qat)                   # converts a copy; fake-quant vs fixed point
    print(epoch, rec.fixed_point, rec.gap)
final_acc = qk.evaluate(qat, test_batches)    # the fixed-point model's accuracy
''',
    fix="evaluate the fixed-point model: qk.evaluate(model, batches) converts a copy and "
        "evaluates it; qk.FixedPointMonitor(batches).step(model) each epoch records the "
        "QAT-vs-fixed-point gap",
    check=_check,
)
