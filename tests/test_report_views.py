"""The report's QuantAnalyzer-style views, each module on its own: weight-only vs
activation-only quantization, "all but this layer" and the float-fallback bisection,
per-channel weight ranges, value histograms and float-vs-QAT weights."""

import dataclasses

import pytest
import torch

import qatkit as qk
from qatkit.analysis.compare import evaluation
from qatkit.analysis.histograms import value_histograms
from qatkit.analysis.keep_float import all_but_one, keep_float
from qatkit.analysis.sensitivity import float_copy, quantize_only, sensitivity
from qatkit.analysis.weight_drift import weight_drift
from qatkit.analysis.weight_ranges import weight_ranges
from qatkit.analysis.weights_activations import weights_vs_activations
from qatkit.demo.recipe import train
from qatkit.quantization.fake_quant import FakeQuantState, fake_quants, set_fake_quantize

from ._diagnosis import MARCH, digits, example, labelled, stages

# these views measure the fake-quant model on purpose (QK006 says to evaluate fixed point)
pytestmark = pytest.mark.filterwarnings("ignore:.*QK006")


def test_keep_float_is_the_complement_of_quantize_only():
    _, calib, _ = stages("conv2", 100.0)
    x, _ = labelled(64)
    others = [n for n in ("quant", "conv1", "conv3", "skip", "conv4", "gap", "fc")]
    with evaluation(calib):
        full = calib(x)
        with keep_float(calib, ["conv2"]):
            kept = calib(x)
            with keep_float(calib, ["conv1"]):  # nested: both in float
                nested = calib(x)
        with quantize_only(calib, others):
            same = calib(x)
        with quantize_only(calib, [n for n in others if n != "conv1"]):
            same_nested = calib(x)
        again = calib(x)
    assert torch.equal(kept, same) and torch.equal(nested, same_nested)
    assert torch.equal(full, again) and not torch.equal(full, kept)
    assert not any("forward" in fq.__dict__ for _, fq in fake_quants(calib))
    with pytest.raises(qk.QatkitError, match="no fake-quantized layer named nope"), \
            keep_float(calib, ["nope"]):
        pass


def test_all_but_one_ranks_the_damaged_layer_and_bisects_to_it():
    _, calib, _ = stages("conv2", 100.0)
    x, y = labelled()
    a = all_but_one(calib, x, y)
    assert a.ranking()[0] == "conv2" and a.fallback == ["conv2"]
    assert a.quantized < a.reference - 0.2  # the damage costs more than 20 points
    for r in a.layers:
        assert r.recovery == pytest.approx(r.metric - a.quantized)
    # the one-layer-at-a-time view agrees on the reference and the quantized model
    s = sensitivity(calib, x, y)
    assert (a.reference, a.quantized) == (s.reference, s.quantized)
    d = a.to_dict(100.0)
    assert d["steps"][0]["metric"] == a.steps[0].metric * 100
    assert d["layers"][0]["recovery"] == a.layers[0].recovery * 100


def test_all_but_one_without_damage_keeps_nothing_in_float():
    _, calib, fixed = stages()
    x, y = labelled()
    a = all_but_one(calib, x, y, tolerance=0.02)
    assert a.quantized >= a.reference - 0.02 and a.fallback == [] and a.steps == []
    assert not all_but_one(calib, x, y, bisect=False).steps
    with pytest.raises(qk.QatkitError, match="converted"):
        all_but_one(fixed, x, y)
    with pytest.raises(qk.QatkitError, match="tolerance"):
        all_but_one(calib, x, y, tolerance=-1)


def test_weights_vs_activations_splits_the_fake_quants():
    _, calib, _ = stages("conv2", 100.0)
    x, y = labelled()
    w = weights_vs_activations(calib, x, y)
    fqs = fake_quants(calib)
    assert w.row("weights").fake_quants == sum(fq.is_weight for _, fq in fqs) == 5
    assert w.row("activations").fake_quants == len(fqs) - 5
    assert w.row("float").drop == 0 and w.row("float").output_sqnr_db == 200.0
    s = sensitivity(calib, x, y)
    assert w.row("all").metric == s.quantized and w.row("float").metric == s.reference
    assert w.row("activations").drop > 0.2 > w.row("weights").drop  # the output scale


def test_weight_ranges_match_the_weights_and_the_fixed_point_model():
    _, calib, fixed = stages()
    with qk.set_march(MARCH):
        prepared, converted = weight_ranges(calib), weight_ranges(fixed)
    assert [r.name for r in prepared] == [r.name for r in converted] == [
        "conv1", "conv2", "conv3", "conv4", "fc"]
    for p, c in zip(prepared, converted):
        w = calib.get_submodule(p.name).weight.detach().to(torch.float64)
        flat = w.reshape(w.shape[0], -1)
        assert p.ch_max == flat.amax(1).tolist() and p.ch_min == flat.amin(1).tolist()
        absmax = flat.abs().amax(1)
        levels = absmax / torch.tensor(p.ch_scale, dtype=torch.float64)
        assert bool(((levels > 127 - 1e-4) & (levels < 128 + 1e-4)).all())  # all int8 levels
        assert c.weights == "dequantized" and c.ch_scale == pytest.approx(p.ch_scale)
        # the dequantized integer weights are within half a step of the float ones (max|w|
        # sits at 127.5 steps: it rounds to 127 or -128, exactly half a step away)
        half = torch.tensor(p.ch_scale, dtype=torch.float64) * 0.5001
        assert bool((torch.tensor(c.ch_max) - torch.tensor(p.ch_max)).abs().le(half).all())
        d = p.to_dict()
        assert d["channels"] == w.shape[0] and d["spread"] >= 1.0
        assert d["widest_channel"] == int(absmax.argmax())


def test_value_histograms_count_every_value_on_shared_bins():
    _, calib, fixed = stages("conv2", 100.0)
    x, _ = labelled(128)
    with qk.set_march(MARCH):
        hs = value_histograms(float_copy(calib), fixed, x)
    by = {h.name: h for h in hs}
    assert {"quant", "conv1", "conv2", "fc"} <= set(by)
    conv1 = by["conv1"]
    assert sum(conv1.float_counts) == sum(conv1.quant_counts) == 128 * 16 * 8 * 8
    assert conv1.edges[0] == min(conv1.float_range[0], conv1.quant_range[0])
    assert by["conv2"].quant_distinct <= 3 < by["conv1"].quant_distinct  # wasted levels
    assert by["conv2"].dtype == "qint8" and by["conv2"].scale > 1.0


def test_weight_drift_is_zero_before_qat_and_measures_qat():
    float_model, calib, _ = stages()
    with qk.set_march(MARCH):
        before = weight_drift(float_model, calib, example())
        assert [d.name for d in before] == ["conv1", "conv2", "conv3", "conv4", "fc"]
        assert all(d.change == 0 and d.levels_changed == 0 and d.cosine == pytest.approx(1)
                   for d in before)
        qat = qk.prepare(float_model, example(), qconfig=qk.default_qat_qconfig())
        qat.load_state_dict(calib.state_dict())
        qat.train()
        set_fake_quantize(qat, FakeQuantState.QAT)
        d = digits()
        small = dataclasses.replace(d, x_train=d.x_train[:256], y_train=d.y_train[:256])
        train(qat, small, 1, lr=1e-2, seed=0, quiet=True, sgd=True)
        after = {d.name: d for d in weight_drift(float_model, qat, example())}
    d = after["conv2"]
    assert d.change > 0 and 0 < d.levels_changed <= 1 and d.max_change_lsb > 0
    ref = qk.fuse(float_model, example()).get_submodule("conv2").weight.detach()
    w = qat.get_submodule("conv2").weight.detach()
    assert d.change == pytest.approx(float((w - ref).norm() / ref.norm()), rel=1e-5)
    with pytest.raises(qk.QatkitError, match="compares the float model"):
        weight_drift(qat, float_model, example())
