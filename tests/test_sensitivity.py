"""Per-layer sensitivity and the int16 suggestion (qatkit.analysis.sensitivity)."""

import json

import pytest
import torch

import qatkit as qk
from qatkit.analysis.compare import evaluation
from qatkit.analysis.sensitivity import (
    apply_int16,
    float_copy,
    quantize_only,
    sensitivity,
    suggest_int16,
    try_int16,
)
from qatkit.demo.recipe import calibration_batches
from qatkit.quantization.fake_quant import fake_quants

from ._diagnosis import digits, example, labelled, stages

LAYERS = {"quant", "conv1", "conv2", "conv3", "skip", "conv4", "gap", "fc"}


def test_quantize_only_switches_fake_quants_and_restores_them():
    float_model, calib, _ = stages()
    x, _ = labelled(64)
    fused = qk.fuse(float_model, example())
    with evaluation(calib):
        full = calib(x)
        with quantize_only(calib, []):
            none = calib(x)
        with quantize_only(calib, ["conv2"]):
            one = calib(x)
        again = calib(x)
    assert torch.allclose(none, fused(x), atol=1e-5)  # all pass-through: the float model
    assert torch.equal(full, again)  # restored
    assert not torch.equal(one, none) and not torch.equal(one, full)
    assert not any("forward" in fq.__dict__ for _, fq in fake_quants(calib))
    assert torch.allclose(float_copy(calib)(x), none)
    with pytest.raises(qk.QatkitError, match="no fake-quantized layer named nope"), \
            quantize_only(calib, ["nope"]):
        pass


def test_damaged_layer_ranks_first_and_is_suggested():
    _, calib, _ = stages("conv2", 20.0)
    x, y = labelled()
    s = sensitivity(calib, x, y, march="nash-e", budget=2)
    assert set(s.ranking()) == LAYERS
    assert s.ranking()[0] == "conv2", [(r.name, r.drop, r.output_sqnr_db) for r in s.layers]
    first = s.layers[0]
    assert first.rank == 1 and first.output_sqnr_db < min(r.output_sqnr_db for r in s.layers[1:])
    assert s.reference >= s.quantized - 0.02
    assert s.suggestion[0] == "conv2" and len(s.suggestion) <= 2
    assert all(s.layer(n).int16_candidate for n in s.suggestion)
    assert not s.layer("fc").int16_candidate  # high-precision output: no int8 output fq
    assert not s.layer("conv3").int16_candidate  # int32 accumulator into the add
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert d["layers"][0]["name"] == "conv2" and d["suggestion"] == s.suggestion


def test_no_int16_on_an_int8_only_march_and_budget_respected():
    _, calib, _ = stages("conv2", 20.0)
    x, y = labelled(200)
    s = sensitivity(calib, x, y, march="bernoulli2", budget=3)
    assert s.ranking()[0] == "conv2" and s.suggestion == [] and not s.int16_allowed
    assert any("no int16" in n for n in s.notes)
    s16 = sensitivity(calib, x, y, march="nash-e")
    assert suggest_int16(s16, 0) == [] and len(suggest_int16(s16, 1)) == 1
    with pytest.raises(qk.QatkitError, match="budget"):
        suggest_int16(s16, -1)


def test_custom_metric_and_agreement_without_labels():
    _, calib, _ = stages("conv2", 20.0)
    x, _ = labelled(200)

    def neg_mse(out, target):  # higher is better
        return -float(((out.softmax(1) - torch.nn.functional.one_hot(target, 10)) ** 2).mean())

    s = sensitivity(calib, x, metric=neg_mse)  # target: the float model's own predictions
    assert s.metric_name == "neg_mse" and s.ranking()[0] == "conv2"
    assert s.layers[0].drop > 0
    s2 = sensitivity(calib, x)
    assert s2.metric_name.startswith("top-1 agreement") and s2.reference == 1.0


def test_applying_the_suggestion_moves_outputs_to_int16_and_repairs_the_damage():
    float_model, calib, _ = stages("conv2", 20.0)
    x, y = labelled()
    new = apply_int16(float_model, calib, ["conv2"], example(),
                      calibration_batches(digits(), n=512))
    fq = new.conv2.activation_post_process
    assert fq.dtype == "qint16"
    # re-calibrated at int16: a scale ~256x finer than the (undamaged) int8 one
    assert float(fq.scale) < float(calib.conv2.activation_post_process.scale) / 20 / 100
    assert new.conv1.activation_post_process.dtype == "qint8"
    assert torch.equal(new.conv1.activation_post_process.scale,
                       calib.conv1.activation_post_process.scale)  # others untouched
    r = try_int16(float_model, calib, ["conv2"], example(),
                  calibration_batches(digits(), n=512), x, y)
    assert r["layers"] == ["conv2"] and r["after"] >= r["before"]
    with qk.set_march("nash-e"), pytest.raises(qk.QatkitError, match="no quantized output"):
        apply_int16(float_model, calib, ["conv3"], example(), [x[:8]])


def test_user_mistakes_are_clear():
    float_model, calib, fixed = stages()
    x, y = labelled(32)
    with pytest.raises(qk.QatkitError, match="prepared"):
        sensitivity(float_model, x, y)
    with pytest.raises(qk.QatkitError, match="converted"):
        sensitivity(fixed, x, y)
    with pytest.raises(qk.QatkitError, match="labels"):
        sensitivity(calib, x, y[:10])
    with pytest.raises(qk.QatkitError, match="no calibration data"):
        try_int16(float_model, calib, ["conv2"], example(), [], x, y)


def test_label_free_targets_fit_the_output_shape():
    from qatkit.analysis.sensitivity import output_sqnr, targets
    dense = torch.randn(2, 4, 5, 5)  # per-pixel classes (segmentation)
    t, fn, name = targets(dense, None, None)
    assert t.shape == (2, 5, 5) and fn(dense, t) == 1.0 and name.startswith("top-1 agreement")
    flat = torch.randn(7)  # no class dim: scored by SQNR against the float output
    t, fn, name = targets(flat, None, None)
    assert fn is output_sqnr and fn(flat, t) == 200.0 and "SQNR" in name
    assert 0 < output_sqnr(flat + 0.01, flat) < 200
