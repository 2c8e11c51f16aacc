"""QK009: the float model is overfitted, judged from its per-epoch training history.

``history`` maps metric names to one value per epoch: ``train_loss``, ``val_loss``,
``train_acc``, ``val_acc`` (Keras' ``loss``, ``accuracy``, ``val_accuracy`` are accepted too).
Accuracies may be fractions or percentages. Pass it to ``qk.prepare(..., history=h)`` or call
``qk.check_overfitting(h)`` before calibration/QAT starts.

Thresholds:

* accuracy gap: final ``train_acc - val_acc`` > 10 points. A well-regularised small CNN on
  digits ends 1-3 points apart; one trained on 60-100 images ends 10-16 apart.
* loss gap (only when no accuracies are given): final ``val_loss > 2 x train_loss`` and the
  difference > 20 % of the first-epoch validation loss (the task's loss scale), so that a
  training loss close to 0 alone does not inflate the ratio.
* validation loss rising: its best epoch is at least 3 epochs before the end, the final value
  is at least 2 % above that best, and the training loss kept falling since then. This is
  "validation loss rising for >= 3 consecutive epochs while the training loss falls", made
  robust to the epoch-to-epoch noise of real training (a one-epoch dip does not reset it, and
  tiny drifts below 2 % do not count).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch.nn as nn

from qatkit.base.errors import fail
from qatkit.doctor.rules import Context, Finding, Rule

MAX_ACC_GAP_POINTS = 10.0
MAX_LOSS_RATIO = 2.0
MIN_LOSS_GAP_FRACTION = 0.2
RISING_EPOCHS = 3
MIN_RISE = 0.02

_ALIASES = {
    "train_loss": ("train_loss", "loss"),
    "val_loss": ("val_loss", "valid_loss", "validation_loss"),
    "train_acc": ("train_acc", "train_accuracy", "acc", "accuracy"),
    "val_acc": ("val_acc", "val_accuracy", "valid_acc", "validation_accuracy"),
}


def _columns(rows: Sequence[Any]) -> dict[str, list[Any]]:
    """A list of per-epoch dicts (the common logging format) as a dict of lists."""
    cols: dict[str, list[Any]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise fail("QK000", f"history[{i}] is a {type(row).__name__}, not a dict: a list "
                       "history must hold one dict of metrics per epoch.",
                       "pass [{'train_loss': ..., 'val_loss': ...}, ...] or a dict of lists")
        for k, v in row.items():
            cols.setdefault(k, []).append(v)
    for k, v in cols.items():
        if len(v) != len(rows):
            raise fail("QK000", f"history: {k!r} is in {len(v)} of the {len(rows)} epochs.",
                       "log every metric in every epoch")
    return cols


def normalize_history(history: Any) -> dict[str, list[float]]:
    """The four series by canonical name (missing ones left out); QK000 on a bad shape.
    ``history`` is a dict of per-epoch lists or a list of per-epoch dicts."""
    if isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        history = _columns(history)
    if not isinstance(history, Mapping):
        raise fail("QK000", f"history must be a dict of per-epoch lists (or a list of per-epoch "
                   f"dicts), got {type(history).__name__}.",
                   "pass e.g. {'train_loss': [...], 'val_loss': [...], 'train_acc': [...], "
                   "'val_acc': [...]} with one value per epoch")
    out: dict[str, list[float]] = {}
    for key, names in _ALIASES.items():
        name = next((n for n in names if n in history), None)
        if name is None:
            continue
        values = history[name]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise fail("QK000", f"history[{name!r}] must be a list with one number per epoch.")
        try:
            out[key] = [float(v) for v in values]
        except (TypeError, ValueError):
            raise fail("QK000", f"history[{name!r}] holds a value that is not a number.",
                       "store plain floats (e.g. loss.item())") from None
    if not out:
        raise fail("QK000", f"history has none of the keys {', '.join(_ALIASES)} "
                   f"(got {', '.join(map(str, history)) or 'none'}).")
    return out


def _points(train: float, val: float, series: list[float]) -> float:
    scale = 1.0 if max(series) > 1.0 else 100.0  # percentages or fractions
    return (train - val) * scale


def _check(ctx: Context) -> Iterator[Finding]:
    if ctx.history is None:
        return
    h = normalize_history(ctx.history)
    tl, vl, ta, va = (h.get(k, []) for k in ("train_loss", "val_loss", "train_acc", "val_acc"))
    if ta and va and all(map(math.isfinite, (ta[-1], va[-1]))):
        gap = _points(ta[-1], va[-1], ta + va)
        if gap > MAX_ACC_GAP_POINTS:
            yield RULE.finding("", f"after {len(va)} epochs the training accuracy exceeds the "
                               f"validation accuracy by {gap:.1f} points (more than "
                               f"{MAX_ACC_GAP_POINTS:g}): the float model is overfitted.")
    elif tl and vl and vl[0] > 0 and tl[-1] > 0:
        diff = vl[-1] - tl[-1]
        if vl[-1] > MAX_LOSS_RATIO * tl[-1] and diff > MIN_LOSS_GAP_FRACTION * vl[0]:
            yield RULE.finding("", f"the final validation loss {vl[-1]:.4g} is "
                               f"{vl[-1] / tl[-1]:.1f} x the training loss {tl[-1]:.4g}: the "
                               "float model is overfitted.")
    if len(vl) > RISING_EPOCHS and all(map(math.isfinite, vl)):
        best = min(range(len(vl)), key=vl.__getitem__)
        since = len(vl) - 1 - best
        falling = not tl or len(tl) != len(vl) or tl[-1] < tl[best]
        if since >= RISING_EPOCHS and vl[-1] > vl[best] * (1 + MIN_RISE) and falling:
            yield RULE.finding("", f"the validation loss has risen for the last {since} epochs "
                               f"(best {vl[best]:.4g} at epoch {best + 1}, now {vl[-1]:.4g}) "
                               "while the training loss kept falling: the float model is "
                               "overfitting. (If you restored the best-validation checkpoint, "
                               f"pass the history up to epoch {best + 1}.)")


def check_overfitting(history: Any, model: nn.Module | None = None
                      ) -> list[Finding]:
    """Warn ([QK009], a QatkitWarning) if the float model's training history shows
    overfitting; returns the findings. Call it before calibration/QAT (``qk.prepare(...,
    history=h)`` does). ``model``, when given, is where ``qk.silence(model, "QK009", ...)``
    is looked up."""
    from qatkit.doctor import guards
    ctx = guards.context(model if model is not None else nn.Module(), "float", history=history)
    return guards.check(ctx, codes=(RULE.code,))


RULE = Rule(
    code="QK009",
    name="overfitting",
    severity="warning",
    stages=("float", "prepare"),
    summary=(
        "Reads the float model's per-epoch history (train_loss, val_loss, train_acc, val_acc) "
        "given to prepare(..., history=...) or qk.check_overfitting(...) and warns, before "
        f"calibration/QAT starts, when the final accuracy gap exceeds {MAX_ACC_GAP_POINTS:g} "
        f"points, when (without accuracies) the validation loss ends above {MAX_LOSS_RATIO:g}x "
        f"the training loss, or when the validation loss has been rising for "
        f"{RISING_EPOCHS}+ epochs (over {MIN_RISE:.0%} above its best) while the training "
        "loss kept falling."),
    why=(
        "Quantization adds noise; an overfitted float model sits in a sharp minimum that this "
        "noise throws off, so calibration and QAT lose far more accuracy than on a model that "
        "generalizes, and no quantization setting can recover accuracy the float model never "
        "had on unseen data. The problem must be solved in float training first."),
    bad="""
few = train_batches[:1]                     # 64 training images: too few for the model
model, history = Net(), {"train_acc": [], "val_acc": []}
opt = torch.optim.Adam(model.parameters(), 1e-2)
for epoch in range(20):
    train_one_epoch(model, opt, few)
    history["train_acc"].append(accuracy(model, few))
    history["val_acc"].append(accuracy(model))
calib = qk.prepare(model, x, qconfig=qk.default_calibration_qconfig(), history=history)
# [QK009] after 20 epochs the training accuracy exceeds the validation accuracy by ... points
""",
    good="""
model, history = Net(), {"train_acc": [], "val_acc": []}
opt = torch.optim.Adam(model.parameters(), 1e-2, weight_decay=1e-4)
for epoch in range(5):                      # all 1347 training images
    train_one_epoch(model, opt)
    history["train_acc"].append(accuracy(model, train_batches))
    history["val_acc"].append(accuracy(model))
calib = qk.prepare(model, x, qconfig=qk.default_calibration_qconfig(), history=history)
""",
    fix="fix the float model first: more (or augmented) training data, regularisation "
        "(weight decay, dropout), a smaller model, or early stopping at the best validation "
        "epoch; then calibrate and run QAT",
    check=_check,
)
