"""The sensitivity-driven qconfig: top-k / ratio / budget of sensitive layers to int16
activations and weights in one call, every change and fallback in the change log."""

from __future__ import annotations

import warnings

import pytest
import torch

import qatkit as qk
from qatkit.analysis.sensitivity import sensitivity
from qatkit.analysis.sensitivity_qconfig import (
    apply_sensitivity_qconfig,
    sensitivity_qconfig,
    try_sensitivity_qconfig,
)
from qatkit.demo.recipe import calibration_batches
from qatkit.fixed_point.modules import QConv2d
from qatkit.quantization.fake_quant import fake_quants

from ._diagnosis import digits, example, labelled, stages


@pytest.fixture(scope="module")
def damaged():
    float_model, calib, _ = stages("conv2", 100.0)
    x, y = labelled()
    return float_model, calib, sensitivity(calib, x, y, march="nash-e"), x, y


def test_top_k_moves_outputs_and_weights_and_logs_each(damaged) -> None:
    float_model, calib, s, _, _ = damaged
    plan = sensitivity_qconfig(s, calib, top_k=2)
    assert plan.layers[0] == "conv2" and len(plan.layers) == 2 and plan.march == "nash-e"
    by = {(c.layer, c.tensor): c for c in plan.changes}
    assert by[("conv2", "activation")].action == "changed"
    assert by[("conv2", "weight")].action == "changed"
    assert by[("conv2", "weight")].old == "qint8" and by[("conv2", "weight")].new == "qint16"
    assert "rank 1 of" in by[("conv2", "activation")].reason
    q = plan.mapping.by_name["conv2"]
    assert q.activation.dtype == "qint16" and q.weight.dtype == "qint16"
    untouched = next(n for n in s.ranking() if n not in plan.layers and n != "quant")
    assert plan.mapping.by_name[untouched].activation.dtype == "qint8"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qk.QatkitWarning)
        new = apply_sensitivity_qconfig(float_model, calib, plan, example(),
                                        calibration_batches(digits(), n=256))
        fixed = qk.convert(new)
    fqs = dict(fake_quants(new))
    assert fqs["conv2.activation_post_process"].dtype == "qint16"
    assert fqs["conv2.weight_fake_quant"].dtype == "qint16"
    assert isinstance(fixed.conv2, QConv2d) and fixed.conv2.weight.dtype == torch.int16
    assert fixed.conv2.out_dtype == "qint16"


def test_fallbacks_on_marches_without_the_dtype(damaged) -> None:
    _, calib, s, _, _ = damaged
    plan = sensitivity_qconfig(s, calib, top_k=1, march="bayes")  # int16 outputs, int8 weights
    by = {(c.layer, c.tensor): c for c in plan.changes}
    assert by[("conv2", "activation")].action == "changed"
    w = by[("conv2", "weight")]
    assert w.action == "fallback" and w.reason == "march bayes has no int16 weights"
    assert plan.mapping.by_name["conv2"].weight.dtype == "qint8"
    none = sensitivity_qconfig(s, calib, top_k=3, march="bernoulli2")
    assert none.changed_layers == [] and none.budget == 0
    assert len(none.changes) >= 3 and all(c.action == "fallback" for c in none.changes)


def test_ratio_budget_and_only_weights(damaged) -> None:
    _, calib, s, _, _ = damaged
    movable = sensitivity_qconfig(s, calib, ratio=1.0)
    half = sensitivity_qconfig(s, calib, ratio=0.5)
    assert len(half.layers) == -(-len(movable.layers) // 2)
    assert half.layers == movable.layers[:len(half.layers)]
    b = sensitivity_qconfig(s, calib, budget=3)
    assert b.layers[0] == "conv2" and len(b.layers) <= 3
    w_only = sensitivity_qconfig(s, calib, top_k=2, activations=False)
    assert {c.tensor for c in w_only.changes} == {"weight"}
    assert "quant" not in w_only.layers  # a QuantStub has no weights
    with pytest.raises(qk.QatkitError, match="exactly one of top_k, ratio, budget"):
        sensitivity_qconfig(s, calib, top_k=1, ratio=0.5)
    with pytest.raises(qk.QatkitError, match="ratio must be in"):
        sensitivity_qconfig(s, calib, ratio=2.0)


def test_the_plan_closes_the_damaged_layers_gap(damaged) -> None:
    float_model, calib, s, x, y = damaged
    plan = sensitivity_qconfig(s, calib, top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qk.QatkitWarning)
        r = try_sensitivity_qconfig(float_model, calib, plan, example(),
                                    calibration_batches(digits(), n=256), x, y)
    assert r["layers"] == ["conv2"] and r["budget"] == 1
    assert r["before"] < r["float"] - 0.02  # the damage is visible in the fixed point
    assert r["gap_closed"] >= 0.5, r
    assert len(r["changes"]) == 2
