"""QK001: qconfigs on modules that are not quantized (loss, pre- and post-processing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qatkit as qk
from qatkit.doctor import guards
from qatkit.doctor.rules import Context, run
from qatkit.quantization import trace as tr
from tests._rules import DigitsNet, digits, qk_warnings, train


class Standardize(nn.Module):
    """Pre-processing: per-dataset mean/std normalisation, done in float before the stub."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LabelSmoothingCE(nn.Module):
    """A hand-written loss (not a torch loss class): found by data flow only."""

    def __init__(self, eps: float = 0.1) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, 1)
        return -(logp.gather(1, target[:, None]).squeeze(1) * (1 - self.eps)
                 + logp.mean(1) * self.eps).mean()


class TrainableNet(nn.Module):
    """A digits classifier that computes its own loss in forward, as many training codebases
    do, with float pre-processing in front of the QuantStub and softmax after the dequant."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.pre = Standardize(mean, std)
        self.net = DigitsNet()
        self.softmax = nn.Softmax(dim=1)
        self.criterion = nn.CrossEntropyLoss()
        self.smooth = LabelSmoothingCE()

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(self.pre(x))
        if target is None:
            return self.softmax(logits)
        return logits, self.criterion(logits, target) + self.smooth(logits, target)


@pytest.fixture(scope="module")
def trained() -> TrainableNet:
    d = digits()
    m = TrainableNet(float(d.x_train.mean()), float(d.x_train.std()))
    return train(m, d.x_train, d.y_train, epochs=2, step=lambda m, x, y: m(x, y)[1])


def _prepare(model: nn.Module) -> nn.Module:
    d = digits()
    with qk.set_march("nash-e"):
        return qk.prepare(model, (d.x_train[:16], d.y_train[:16]))


def test_vendor_style_qconfig_on_whole_model_warns_on_each_unquantized_module(trained):
    import copy
    model = copy.deepcopy(trained)
    model.qconfig = qk.default_qat_qconfig()  # inherited by pre, softmax and both losses
    with pytest.warns(qk.QatkitWarning, match=r"\[QK001\]") as rec:
        qat = _prepare(model)
    msgs = {str(w.message) for w in rec if "[QK001]" in str(w.message)}
    by_module = {m.split("'")[1]: m for m in msgs}
    # softmax runs only on the inference path, which this trace (with targets) does not take
    assert set(by_module) == {"pre", "criterion", "smooth"}
    assert "is a loss (CrossEntropyLoss)" in by_module["criterion"]
    assert "loss-like value (LabelSmoothingCE)" in by_module["smooth"]
    assert "pre-processing" in by_module["pre"]
    assert "test_rules_qk001.py:" in by_module["pre"]  # the call site
    assert "model.criterion.qconfig = None" in by_module["criterion"]
    assert {w.message.code for w in rec} == {"QK001"}
    # prepare kept them float, and the model still trains/evaluates
    assert isinstance(qat.criterion, nn.CrossEntropyLoss)
    assert qat(digits().x_test[:4]).shape == (4, 10)


def test_qconfig_only_where_quantized_is_clean(trained):
    import copy
    model = copy.deepcopy(trained)
    model.qconfig = qk.default_qat_qconfig()
    for name in ("pre", "softmax", "criterion", "smooth"):
        getattr(model, name).qconfig = None
    with qk_warnings() as codes:
        _prepare(model)
    assert codes == []


def test_global_qconfig_mapping_with_exclusions_is_clean(trained):
    mapping = qk.QConfigMapping(qk.default_qat_qconfig())
    for name in ("pre", "softmax", "criterion", "smooth"):
        mapping.set_module_name(name, None)
    d = digits()
    with qk_warnings() as codes, qk.set_march("nash-e"):
        qk.prepare(trained, (d.x_train[:16], d.y_train[:16]), qconfig=mapping)
    assert "QK001" not in codes


def test_loss_attribute_never_called_in_forward_is_found_by_type():
    d = digits()
    model = DigitsNet()
    model.loss_fn = nn.CrossEntropyLoss()  # used by the training loop, outside forward
    model.qconfig = qk.default_qat_qconfig()
    with pytest.warns(qk.QatkitWarning, match=r"\[QK001\] module 'loss_fn'"), \
            qk.set_march("bayes"):
        qk.prepare(model, d.x_train[:8])


def test_doctor_float_stage_reads_qconfig_attributes(trained):
    import copy
    model = copy.deepcopy(trained)
    model.softmax.qconfig = qk.default_qat_qconfig()  # the only misplaced one
    d = digits()
    g = tr.trace(model, d.x_train[:4])  # the inference path: softmax after the dequant
    findings = list(run(Context(model=model, stage="float", graph=g), codes={"QK001"}))
    assert [(f.code, f.module, f.severity) for f in findings] == [("QK001", "softmax",
                                                                   "warning")]
    assert "post-processing" in findings[0].message
    qk.silence(model.softmax, "QK001", "kept on purpose for the test")
    ctx = guards.context(model, "float", graph=g)
    assert [f.silenced for f in run(ctx, {"QK001"})] == ["kept on purpose for the test"]
