"""Per-layer comparison between stages (qatkit.analysis.compare)."""

import json
import math

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.analysis.compare import Recorder, compare, record
from qatkit.quantization.calibrate import calibrate
from qatkit.quantization.fake_quant import FakeQuantState, fake_quants

from ._diagnosis import MARCH, example, labelled, stages

LAYERS = ["quant", "conv1", "conv2", "conv3", "skip", "pool", "conv4", "gap", "fc", "dequant"]


@pytest.fixture(scope="module")
def damaged():
    return stages("conv2", 20.0)


@pytest.fixture(scope="module")
def healthy():
    return stages()


def test_layers_matched_by_name_in_depth_order(healthy):
    float_model, calib, fixed = healthy
    x, _ = labelled(128)
    for a, b, names in ((float_model, calib, ("float", "fake quant")),
                        (calib, fixed, ("fake quant", "fixed point")),
                        (float_model, fixed, ("float", "fixed point"))):
        r = compare(a, b, x)
        assert (r.a, r.b) == names
        assert [lc.name for lc in r.layers] == LAYERS
        assert [lc.index for lc in r.layers] == list(range(len(LAYERS)))
        assert not r.only_a and not r.only_b
        assert r.samples == 128
        for lc in r.layers:
            assert -1.0 <= lc.cosine <= 1.0 + 1e-12
            assert lc.max_abs_error >= lc.mean_abs_error >= 0
    r = compare(float_model, calib, x)
    assert any("fused" in n for n in r.notes)  # float side aligned with the fused model
    conv1 = r.layer("conv1")
    assert conv1.dtype == "qint8" and conv1.scale == pytest.approx(
        float(calib.conv1.activation_post_process.scale))
    assert r.layer("conv3").dtype is None  # accumulator output: no scale in fake quant
    assert r.layer("pool").scale == r.layer("skip").scale  # pass-through keeps the scale
    assert r.output["top1_agreement"] > 0.9


def test_fixed_point_adds_at_most_one_lsb_on_identical_inputs(healthy):
    """QAT/calibrated vs fixed point: with identical inputs each op's integer arithmetic
    differs from fake quant by rounding only (docs/fixed-point.md)."""
    _, calib, fixed = healthy
    r = compare(calib, fixed, labelled(128)[0])
    for lc in r.layers:
        if lc.own_max_error_lsb is not None:
            assert lc.own_max_error_lsb <= 1.0 + 1e-4, lc  # float32 dequantization
    assert r.layer("quant").sqnr_db == math.inf  # the same input quantization
    assert r.layer("pool").own_sqnr_db == math.inf  # max pooling is exact
    assert r.output["cosine"] > 0.9999


def test_damaged_layer_ranks_first_in_every_comparison(damaged):
    float_model, calib, fixed = damaged
    x, _ = labelled(256)
    for a, b in ((float_model, calib), (float_model, fixed), (calib, fixed)):
        r = compare(a, b, x)
        assert r.worst().name == "conv2", [(lc.name, lc.own_sqnr_db) for lc in r.ranking()]
    r = compare(float_model, fixed, x)
    conv2 = r.layer("conv2")
    assert conv2.own_sqnr_db < 25 < min(lc.own_sqnr_db for lc in r.layers
                                        if lc.name != "conv2" and lc.own_sqnr_db is not None)
    # the damage's error stays below one (huge) LSB: the scale, not rounding, is the fault
    assert conv2.max_error_lsb < 1.0


def test_to_dict_is_strict_json(damaged):
    float_model, _, fixed = damaged
    d = compare(float_model, fixed, labelled(64)[0]).to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["ranking"][0] == "conv2"
    pool = next(lc for lc in back["layers"] if lc["name"] == "pool")
    assert pool["own_sqnr_db"] is None  # exact: inf is written as null
    hist = back["layers"][2]["error_hist"]
    assert hist["unit"] == "lsb" and len(hist["edges"]) == len(hist["counts"]) + 1
    assert sum(hist["counts"]) == 64 * 16 * 8 * 8


def test_models_are_left_as_they_were(healthy):
    float_model, calib, fixed = healthy
    calib.train()
    for _, fq in fake_quants(calib):
        fq.state = FakeQuantState.QAT
    before = {k: v.clone() for k, v in calib.state_dict().items()
              if isinstance(v, torch.Tensor)}
    compare(float_model, calib, labelled(32)[0])
    assert calib.training and all(fq.state is FakeQuantState.QAT for _, fq in fake_quants(calib))
    after = calib.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    calib.eval()
    for _, fq in fake_quants(calib):
        fq.state = FakeQuantState.VALIDATION
    assert not any("add" in m.__dict__ for m in fixed.modules())  # wrappers removed


class Twice(nn.Module):
    """One FloatFunctional called at two places (silenced QK007) to check call numbering."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = qk.QuantStub()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.add = qk.FloatFunctional()
        self.dequant = qk.DeQuantStub()

    def forward(self, x):
        x = self.relu(self.conv(self.quant(x)))
        x = self.add.add(x, x)
        return self.dequant(self.add.add(x, x))


def test_shared_calls_are_numbered():
    torch.manual_seed(0)
    m = Twice().eval()
    qk.silence(m.add, "QK007", "testing call numbering")
    x = torch.randn(8, 1, 6, 6)
    with qk.set_march(MARCH):
        calib = calibrate(qk.prepare(m, x[:2], qconfig=qk.default_calibration_qconfig()), [x])
        fixed = qk.convert(calib)
    calls, _ = record(fixed, x)
    assert [c.label for c in calls] == ["quant", "conv", "add", "add#1", "dequant"]
    assert [c.method for c in calls if c.name == "add"] == ["add", "add"]
    r = compare(calib, fixed, x)
    assert [lc.name for lc in r.layers] == ["quant", "conv", "add", "add#1", "dequant"]
    assert r.layer("add#1").call == 1 and r.layer("add#1").module == "add"
    assert r.layer("add#1").input_scales == [r.layer("add").scale] * 2


def test_recorder_restores_the_model():
    _, _, fixed = stages()
    seen = []
    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in fixed.modules())

    before = hooks()
    with Recorder(fixed, seen.append):
        assert hooks() > before
        fixed(example())
    assert hooks() == before
    assert [c.label for c in seen] == LAYERS
    fixed(example())  # after the block nothing is recorded any more
    assert len(seen) == len(LAYERS)


def test_user_mistakes_are_clear():
    float_model, _, fixed = stages()
    with pytest.raises(qk.QatkitError, match=r"two nn\.Module"):
        compare(float_model, "fixed", example())
    with pytest.raises(qk.QatkitError, match="not a tensor"):
        compare(float_model, fixed, "x")


def test_calibrated_vs_qat(healthy):
    """Two prepared stages: QAT changed the weights, scales stayed (calibrated, fixed)."""
    from qatkit.demo.recipe import train

    from ._diagnosis import digits
    float_model, calib, _ = healthy
    with qk.set_march(MARCH):
        qat = qk.prepare(float_model, example(), qconfig=qk.default_qat_qconfig())
    qat.load_state_dict(calib.state_dict())
    qat.train()
    qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
    train(qat, digits(), 1, lr=1e-3, seed=1, quiet=True, sgd=True)
    r = compare(calib, qat, labelled(128)[0], names=("calibrated", "QAT"))
    assert (r.a, r.b) == ("calibrated", "QAT") and [lc.name for lc in r.layers] == LAYERS
    assert r.layer("quant").sqnr_db == math.inf  # same input scale, same input
    conv1 = r.layer("conv1")
    assert conv1.own_max_abs_error > 0 and conv1.scale == pytest.approx(
        float(calib.conv1.activation_post_process.scale))  # the calibrated scale stayed
    assert qat.training  # left in its training mode
