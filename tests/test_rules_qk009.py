"""QK009: an overfitted float model, judged from its training history before calibration."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.doctor.rules.qk009_overfitting import check_overfitting
from tests._rules import digits, qk_warnings


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.fc1, self.relu, self.fc2 = nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc2(self.relu(self.fc1(self.quant(x).flatten(1)))))


@functools.cache
def fit(n_train: int, epochs: int, lr: float) -> tuple[MLP, dict[str, list[float]]]:
    """Train on the first ``n_train`` digits; the history a training script would log."""
    d = digits()
    x, y = d.x_train[:n_train], d.y_train[:n_train]
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr)
    h: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "train_acc": [],
                                 "val_acc": []}
    for _ in range(epochs):
        model.train()
        for i in range(0, n_train, 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for split, xs, ys in (("train", x, y), ("val", d.x_test, d.y_test)):
                out = model(xs)
                h[f"{split}_loss"].append(nn.functional.cross_entropy(out, ys).item())
                h[f"{split}_acc"].append((out.argmax(1) == ys).float().mean().item())
    return model, h


def test_small_training_set_overfits_and_is_reported_at_prepare():
    model, history = fit(100, 30, 1e-2)  # 100 images, 30 epochs: train acc 1.0
    d = digits()
    with qk.set_march("nash-e"), pytest.warns(
            qk.QatkitWarning, match=r"\[QK009\] the validation loss has risen for the last "
                                    r"\d+ epochs .* while the training loss kept falling") as rec:
        qk.prepare(model, d.x_train[:8], qconfig=qk.default_calibration_qconfig(),
                   history=history)
    assert {w.message.code for w in rec} == {"QK009"}


def test_tiny_training_set_has_a_large_accuracy_gap():
    _, history = fit(60, 40, 3e-3)
    with pytest.warns(qk.QatkitWarning, match=r"\[QK009\] after 40 epochs the training accuracy "
                                              r"exceeds the validation accuracy by 1\d\.\d "
                                              r"points"):
        findings = check_overfitting(history)
    assert [f.code for f in findings] == ["QK009"]


def test_well_fitted_model_is_clean():
    model, history = fit(len(digits().y_train), 8, 3e-3)
    d = digits()
    with qk.set_march("nash-e"), qk_warnings() as codes:
        qk.prepare(model, d.x_train[:8], qconfig=qk.default_calibration_qconfig(),
                   history=history)
    assert codes == []
    assert history["val_acc"][-1] > 0.9


def test_keras_names_percentages_and_loss_only_histories():
    keras = {"loss": [1.0, 0.5, 0.2, 0.1, 0.05], "val_loss": [1.1, 0.7, 0.6, 0.55, 0.6],
             "accuracy": [70.0, 85.0, 95.0, 99.0, 100.0],
             "val_accuracy": [68.0, 80.0, 84.0, 86.0, 87.0]}
    with pytest.warns(qk.QatkitWarning, match=r"by 13.0 points"):
        check_overfitting(keras)
    losses = {"train_loss": [2.0, 1.0, 0.4, 0.1], "val_loss": [2.1, 1.2, 0.9, 0.85]}
    with pytest.warns(qk.QatkitWarning, match=r"\[QK009\] the final validation loss 0.85 is "
                                              r"8.5 x the training loss"):
        check_overfitting(losses)
    with qk_warnings() as codes:
        check_overfitting({"train_loss": [2.0, 1.0, 0.5], "val_loss": [2.1, 1.1, 0.6]})
    assert codes == []


def test_silencing_and_usage_errors():
    model, history = fit(100, 30, 1e-2)
    qk.silence(model, "QK009", "restored the best epoch")
    with qk_warnings() as codes:
        findings = check_overfitting(history, model)
    assert codes == [] and findings and all(f.silenced for f in findings)
    with pytest.raises(qk.QatkitError, match=r"^\[QK000\] history\[0\] is a float, not a dict"):
        check_overfitting([0.1, 0.2])  # type: ignore[arg-type]
    with pytest.raises(qk.QatkitError, match=r"^\[QK000\] history must be a dict"):
        check_overfitting(0.1)  # type: ignore[arg-type]
    with pytest.raises(qk.QatkitError, match=r"^\[QK000\] history has none of the keys"):
        check_overfitting({"lr": [0.1]})


def test_a_list_of_per_epoch_dicts_is_the_same_history():
    _, history = fit(100, 30, 1e-2)
    rows = [dict(zip(history, values)) for values in zip(*history.values())]
    with qk_warnings():
        by_lists = check_overfitting(history)
        by_rows = check_overfitting(rows)
    assert by_lists and [f.message for f in by_rows] == [f.message for f in by_lists]
