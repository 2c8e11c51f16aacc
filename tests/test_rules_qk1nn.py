"""QK100-QK106: for each rule a realistic bad example that triggers it and its corrected form.

Rules wired into prepare (QK100, QK102, QK106) are checked through ``qk.prepare`` itself;
the others through ``qk.doctor.check`` and the workflow guards.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qatkit as qk
from qatkit import doctor
from qatkit.base.errors import QatkitError, QatkitWarning
from qatkit.quantization.qconfig import QConfig, QuantSpec
from tests.models import warm_bn

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _march():
    with qk.set_march("nash-e"):
        yield


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def codes(report: doctor.Report) -> list[str]:
    return [f.code for f in report.findings]


def qk_warnings(fn, *args, **kwargs):
    """Call fn; return (result, [codes of qatkit warnings])."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [w.message.code for w in rec if isinstance(w.message, QatkitWarning)]


def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    model.eval()
    qk.set_fake_quantize(model, qk.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for b in batches:
            model(b)
    return model


# ------------------------------------------------------------------------------ models
class TorchvisionBlockNet(nn.Module):
    """A ResNet basic block written as torchvision writes it: one ReLU module called at two
    places, and an F.relu in the stem."""

    def __init__(self, share_relu: bool = True, functional_relu: bool = True) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.functional_relu = functional_relu
        self.stem, self.stem_bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.stem_relu = nn.ReLU()
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.relu_out = self.relu if share_relu else nn.ReLU()
        self.add = qk.FloatFunctional()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_bn(self.stem(self.quant(x)))
        x = F.relu(x) if self.functional_relu else self.stem_relu(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu_out(self.add.add(self.bn2(self.conv2(out)), x))
        return self.dequant(self.fc(self.pool(out).flatten(1)))


class SmallNet(nn.Module):
    """conv-bn-relu x2, optional auxiliary head, residual add, classifier."""

    def __init__(self, act: nn.Module | None = None, pool: nn.Module | None = None,
                 aux: bool = False) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), \
            nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.act = act if act is not None else nn.ReLU()
        self.add = qk.FloatFunctional()
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        k = self.pool.output_size
        self.fc = nn.Linear(16 * k * k, 10)
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, 10)) if aux else None
        self.aux_out = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        if self.aux is not None and self.training:  # auxiliary loss during training only
            self.aux_out = self.aux(x)
        x = self.act(self.add.add(self.bn2(self.conv2(x)), x))
        return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))


def small_net(**kw) -> nn.Module:
    torch.manual_seed(0)
    return warm_bn(SmallNet(**kw), _x(4, 3, 16, 16))


# ------------------------------------------------------------------------------ QK100
def test_qk100_shared_and_functional_relu_are_fused_without_warning():
    """torchvision's habits (one ReLU module called twice, F.relu in the stem) fuse like one
    nn.ReLU per call site: the kept ReLU call does nothing to non-negative values."""
    torch.manual_seed(0)
    m, x = warm_bn(TorchvisionBlockNet(), _x(4, 3, 16, 16)), _x(2, 3, 16, 16)
    p, got = qk_warnings(qk.prepare, m, x, qconfig=qk.default_calibration_qconfig())
    assert "QK100" not in got
    assert p.stem.activation == p.conv1.activation == "relu"
    assert p.add.fused_activation == "relu"
    assert "QK100" not in codes(doctor.check(m, x))
    separate = TorchvisionBlockNet(share_relu=False, functional_relu=False)
    separate.load_state_dict(m.state_dict())
    q = qk.prepare(separate.eval(), x, qconfig=qk.default_calibration_qconfig())
    for model in (p, q):
        qk.calibrate(model, [x])
    with torch.no_grad():  # the very same integers as with one ReLU module per call site
        assert torch.equal(qk.convert(p)(x), qk.convert(q)(x))


def test_qk100_bn_left_unfused_in_prepared_model():
    m, x = small_net(), _x(2, 3, 16, 16)
    with pytest.raises(QatkitError) as e:  # the BN would stay float: QK106 stops prepare
        qk.prepare(m, x, qconfig=qk.default_qat_qconfig(), fuse=False)
    assert e.value.code == "QK106" and "BatchNorm2d" in str(e.value)
    qk.silence(m.bn1, "QK106", "test: look at the unfused pattern")
    qk.silence(m.bn2, "QK106", "test: look at the unfused pattern")
    p, got = qk_warnings(qk.prepare, m, x, qconfig=qk.default_qat_qconfig(), fuse=False)
    assert "QK100" in got
    f = [f for f in doctor.check(p, x).findings if f.code == "QK100"]
    assert {g.module for g in f} == {"conv1", "conv2", "add"}  # add -> ReLU too
    assert "BatchNorm2d 'bn1' -> ReLU 'relu1'" in f[0].message


def test_qk100_good_one_module_per_call_site():
    torch.manual_seed(0)
    m = warm_bn(TorchvisionBlockNet(share_relu=False, functional_relu=False), _x(4, 3, 16, 16))
    x = _x(2, 3, 16, 16)
    p, got = qk_warnings(qk.prepare, m, x, qconfig=qk.default_qat_qconfig())
    assert "QK100" not in got
    assert "QK100" not in codes(doctor.check(m, x)) + codes(doctor.check(p, x))


# ------------------------------------------------------------------------------ QK101
def test_qk101_training_only_head_is_not_dead_but_a_dead_head_is_reported_once():
    m, x = small_net(aux=True), _x(2, 3, 16, 16)
    assert "QK101" not in codes(doctor.check(m, x))  # aux runs in train() mode: no dead code
    m.dead = nn.Sequential(nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(8, 10))
    r = doctor.check(m, x)
    found = [f for f in r.findings if f.code == "QK101"]
    assert [f.module for f in found] == ["dead"]  # the head, not each of its layers
    assert "Sequential 'dead' with 226 parameters" in found[0].message
    qk.silence(m.dead, "QK101", "kept for an experiment")
    r = doctor.check(m, x)
    assert "QK101" not in codes(r)
    assert [(f.code, f.module, f.silenced) for f in r.silenced] == [
        ("QK101", "dead", "kept for an experiment")]


def test_qk101_unused_floatfunctional_and_good_model():
    class Net(SmallNet):
        def __init__(self) -> None:
            super().__init__()
            self.add_unused = qk.FloatFunctional()

    torch.manual_seed(0)
    m, x = warm_bn(Net(), _x(4, 3, 16, 16)), _x(2, 3, 16, 16)
    assert [f.module for f in doctor.check(m, x).findings if f.code == "QK101"] == [
        "add_unused"]
    assert "QK101" not in codes(doctor.check(small_net(), x))


# ------------------------------------------------------------------------------ QK102
class PlusResidual(SmallNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.act(self.bn2(self.conv2(x)) + x)  # '+' instead of a FloatFunctional
        return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))


class MaskedNet(nn.Module):
    """Image and validity mask: the mask must be quantized too before it multiplies."""

    def __init__(self, quantize_mask: bool) -> None:
        super().__init__()
        self.quant, self.quant_mask = qk.QuantStub(), qk.QuantStub()
        self.quantize_mask = quantize_mask
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.mul = qk.FloatFunctional()
        self.head = nn.Conv2d(8, 2, 1)
        self.dequant = qk.DeQuantStub()

    def forward(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        f = self.relu(self.conv(self.quant(img)))
        m = self.quant_mask(mask) if self.quantize_mask else mask
        return self.dequant(self.head(self.mul.mul(f, m)))


class ExpResidual(SmallNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.act(self.bn2(self.conv2(x)) + x)  # '+': a generated add operator
        return self.dequant(self.fc(torch.flatten(self.pool(x.exp()), 1)))  # exp: no operator


def test_qk102_call_without_operator_stops_prepare():
    m, x = warm_bn(PlusResidual(), _x(4, 3, 16, 16)), _x(2, 3, 16, 16)
    p = qk.prepare(m, x, qconfig=qk.default_qat_qconfig())  # '+' is an operator now
    assert "qatkit_ops.add_0" in dict(p.named_modules())
    m, x = warm_bn(ExpResidual(), _x(4, 3, 16, 16)), _x(2, 3, 16, 16)
    with pytest.raises(QatkitError) as e:
        qk.prepare(m, x, qconfig=qk.default_qat_qconfig())
    assert e.value.code == "QK102"
    assert "exp()" in str(e.value) and "test_rules_qk1nn.py:" in str(e.value)
    f = [f for f in doctor.check(m, x).errors if f.code == "QK102"]
    assert len(f) == 1 and f[0].source.startswith("test_rules_qk1nn.py:")


def test_qk102_float_tensor_into_quantized_op():
    torch.manual_seed(0)
    x = (_x(2, 3, 8, 8), (_x(2, 1, 8, 8) > 0).float())
    with pytest.raises(QatkitError) as e:
        qk.prepare(MaskedNet(False).eval(), x, qconfig=qk.default_qat_qconfig())
    assert e.value.code == "QK102" and "'mul'" in str(e.value)
    assert "the model input (no QuantStub on this path)" in str(e.value)
    p = qk.prepare(MaskedNet(True).eval(), x, qconfig=qk.default_qat_qconfig())
    assert "QK102" not in codes(doctor.check(p, x))


def test_qk102_module_with_qconfig_none_inside_region():
    m, x = small_net(), _x(2, 3, 16, 16)
    m.qconfig = qk.default_qat_qconfig()
    m.fc.qconfig = None  # "keep the classifier float" without leaving the region
    with pytest.raises(QatkitError) as e:
        qk.prepare(m, x)
    assert e.value.code == "QK102" and "'fc'" in str(e.value)
    assert "qconfig is None" in str(e.value)


def test_qk102_good_floatfunctional_and_dequant_before_float_part():
    class Good(SmallNet):
        def __init__(self) -> None:
            super().__init__()
            self.dequant_feat = qk.DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu1(self.bn1(self.conv1(self.quant(x))))
            x = self.act(self.add.add(self.bn2(self.conv2(x)), x))
            feat = self.dequant_feat(torch.flatten(self.pool(x), 1))
            return self.fc(feat)  # float classifier after the region

    torch.manual_seed(0)
    m, x = warm_bn(Good(), _x(4, 3, 16, 16)), _x(2, 3, 16, 16)
    m.qconfig = qk.default_qat_qconfig()
    m.fc.qconfig = None
    p = qk.prepare(m, x)
    assert "QK102" not in codes(doctor.check(m, x)) + codes(doctor.check(p, x))


# ------------------------------------------------------------------------------ QK103
def test_qk103_some_nan_in_calibration_warns_once_at_the_origin():
    m, x = small_net(), _x(8, 3, 16, 16)
    p = qk.prepare(m, x, qconfig=qk.default_calibration_qconfig())
    bad = x.clone()
    bad[3, :, 4:6, 4:6] = float("nan")  # one corrupt image
    calibrate(p, [x, bad])
    _, got = qk_warnings(qk.set_fake_quantize, p, qk.FakeQuantState.VALIDATION)
    assert got.count("QK103") == 1
    f = [f for f in doctor.check(p, x).findings if f.code == "QK103"]
    assert len(f) == 1 and f[0].module == "quant" and f[0].severity == "warning"
    assert "later observer(s) saw NaN/Inf too" in f[0].message


def test_qk103_all_nan_is_an_error_and_nan_weights_too():
    m, x = small_net(), _x(8, 3, 16, 16)
    p = calibrate(qk.prepare(m, x, qconfig=qk.default_calibration_qconfig()),
                  [torch.full_like(x, float("nan"))])
    with pytest.raises(QatkitError) as e:
        qk.set_fake_quantize(p, qk.FakeQuantState.VALIDATION)
    assert e.value.code == "QK103" and "only NaN/Inf" in str(e.value)
    with torch.no_grad():
        m.conv2.weight[0, 0, 0, 0] = float("inf")
    r = doctor.check(m, x)
    assert any(f.code == "QK103" and f.module == "conv2" for f in r.errors)


def test_qk103_good_finite_data():
    m, x = small_net(), _x(8, 3, 16, 16)
    p = calibrate(qk.prepare(m, x, qconfig=qk.default_calibration_qconfig()), [x, x * 0.5])
    _, got = qk_warnings(qk.set_fake_quantize, p, qk.FakeQuantState.VALIDATION)
    assert "QK103" not in got and "QK103" not in codes(doctor.check(p, x))


# ------------------------------------------------------------------------------ QK104
class FeatureAndLogits(nn.Module):
    """Concatenates backbone features with a prediction head's logits (a common way to feed
    both to a second stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.feat = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.logits = nn.Conv2d(16, 4, 1)
        self.cat = qk.FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.quant(x))
        return self.dequant(self.cat.cat([self.feat(x), self.logits(x)], 1))


def _feature_and_logits(imbalanced: bool) -> nn.Module:
    torch.manual_seed(0)
    m = warm_bn(FeatureAndLogits(), _x(4, 3, 16, 16))
    if imbalanced:  # unnormalized features (~0..60) next to small logits (~+-0.5)
        with torch.no_grad():
            m.feat[0].weight.mul_(30)
            m.logits.weight.mul_(0.1)
    return m


@pytest.mark.parametrize("imbalanced", [True, False])
def test_qk104_cat_of_inputs_with_very_different_scales(imbalanced):
    x = _x(8, 3, 16, 16)
    p = calibrate(qk.prepare(_feature_and_logits(imbalanced), x,
                             qconfig=qk.default_calibration_qconfig()), [x])
    found = [f for f in doctor.check(p, x).findings if f.code == "QK104"]
    if not imbalanced:
        assert not found
        return
    assert len(found) == 1 and found[0].module == "cat" and found[0].severity == "warning"
    assert "'logits'" in found[0].message and "'feat.0'" in found[0].message
    qk.set_fake_quantize(p, qk.FakeQuantState.VALIDATION)
    q = qk.convert(p)  # the converted model's scales give the same finding
    assert [f.module for f in doctor.check(q, x).findings if f.code == "QK104"] == ["cat"]


class BranchSecond(SmallNet):
    """add(identity, relu(branch)): the branch's conv takes the ReLU, so it is not fused into
    the add (an int32 accumulator would be skipped) and both operands are int8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.add.add(x, self.act(self.bn2(self.conv2(x))))
        return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))


def test_qk104_residual_add_with_vanishing_branch():
    torch.manual_seed(0)
    m, x = warm_bn(BranchSecond(), _x(4, 3, 16, 16)), _x(8, 3, 16, 16)
    with torch.no_grad():
        m.bn2.weight.mul_(1e-3)  # zero-init-residual style branch that never grew
        m.bn2.bias.mul_(1e-3)
    p = calibrate(qk.prepare(m, x, qconfig=qk.default_calibration_qconfig()), [x])
    found = [f for f in doctor.check(p, x).findings if f.code == "QK104"]
    assert [f.module for f in found] == ["add"] and "limit 32x" in found[0].message
    torch.manual_seed(0)
    good = warm_bn(BranchSecond(), _x(4, 3, 16, 16))
    good = calibrate(qk.prepare(good, x, qconfig=qk.default_calibration_qconfig()), [x])
    assert "QK104" not in codes(doctor.check(good, x))


# ------------------------------------------------------------------------------ QK105
def test_qk105_weight_outlier_and_clipped_fix():
    m, x = small_net(), _x(2, 3, 16, 16)
    with torch.no_grad():
        m.conv2.weight[5, 7, 1, 1] = 50 * m.conv2.weight.abs().max()
    found = [f for f in doctor.check(m, x).findings if f.code == "QK105"]
    assert [f.module for f in found] == ["conv2"]
    assert "1 of 16 output channels" in found[0].message and "channel 5" in found[0].message
    with torch.no_grad():  # the documented fix: clip to 4x the 99th percentile
        w = m.conv2.weight
        t = 4 * w.abs().flatten(1).quantile(0.99, dim=1).view(-1, 1, 1, 1)
        w.copy_(torch.maximum(torch.minimum(w, t), -t))
    assert "QK105" not in codes(doctor.check(m, x))


def test_qk105_activation_range_stretched_by_rare_spikes():
    x = _x(8, 3, 16, 16)
    spiky = x * 0.05
    spiky.view(-1)[::500] = 30.0  # rare saturated pixels in otherwise dark images
    p = calibrate(qk.prepare(small_net(), x, qconfig=qk.default_calibration_qconfig()),
                  [spiky])
    found = [f for f in doctor.check(p, x).findings if f.code == "QK105"]
    assert "quant" in [f.module for f in found]
    assert "quantization steps" in found[0].message
    good = calibrate(qk.prepare(small_net(), x, qconfig=qk.default_calibration_qconfig()), [x])
    assert "QK105" not in codes(doctor.check(good, x))


def test_qk105_threshold_clipping_too_much():
    x = _x(8, 3, 16, 16)
    q95 = QConfig(QuantSpec(observer="percentile", observer_kwargs=(("percentile", 95.0),)),
                  QuantSpec(per_channel=True))
    p = calibrate(qk.prepare(small_net(), x, qconfig=q95), [x])
    found = [f for f in doctor.check(p, x).findings if f.code == "QK105"]
    assert found and all("clips" in f.message for f in found)
    # at convert the guard warns too
    qk.set_fake_quantize(p, qk.FakeQuantState.VALIDATION)
    _, got = qk_warnings(qk.convert, p)
    assert "QK105" in got


def test_qk105_scale_far_wider_than_observed_range_in_qat_and_reloaded_models():
    """The min/max every observer keeps (and checkpoints carry) finds a scale made far too
    large by hand, in a QAT model (moving-average observers, no histogram) as at convert."""
    from qatkit.analysis.report import damage
    x = _x(8, 3, 16, 16)
    net = small_net()
    calib = calibrate(qk.prepare(net, x, qconfig=qk.default_calibration_qconfig()), [x])
    qat = qk.prepare(net, x, qconfig=qk.default_qat_qconfig())
    qat.load_state_dict(calib.state_dict())
    qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
    qat.eval()
    assert "QK105" not in codes(doctor.check(qat, x))  # scales from the data: none
    damage(qat, "conv1", 20.0)
    found = [f for f in doctor.check(qat, x).findings if f.code == "QK105"]
    assert [f.module for f in found] == ["conv1"]
    assert "what its observed range needs" in found[0].message
    _, got = qk_warnings(qk.convert, qat)  # and the guard warns at convert
    assert "QK105" in got
    damage(qat, "conv1", 1 / 4)  # 5x the data's range: under 3 bits wasted, no finding
    assert "QK105" not in codes(doctor.check(qat, x))


# ------------------------------------------------------------------------------ QK106
def test_qk106_unsupported_type_stops_prepare_and_lists_supported():
    m, x = small_net(act=nn.ELU()), _x(2, 3, 16, 16)
    with pytest.raises(QatkitError) as e:
        qk.prepare(m, x, qconfig=qk.default_qat_qconfig())
    assert e.value.code == "QK106"
    assert "'act'" in str(e.value) and "ELU" in str(e.value)
    assert "Supported:" in str(e.value) and "SiLU" in str(e.value)
    assert "QK106" in [f.code for f in doctor.check(m, x).errors]


def test_qk106_unsupported_configuration():
    m, x = small_net(pool=nn.AdaptiveAvgPool2d(3)), _x(2, 3, 16, 16)  # 16 is not 3k
    with pytest.raises(QatkitError) as e:
        qk.prepare(m, x, qconfig=qk.default_qat_qconfig())
    assert e.value.code == "QK106" and "(16, 16) to (3, 3)" in str(e.value)


def test_qk106_good_supported_ops():
    m, x = small_net(act=nn.SiLU(), pool=nn.AdaptiveAvgPool2d(2)), _x(2, 3, 16, 16)
    p = qk.prepare(m, x, qconfig=qk.default_qat_qconfig())
    assert "QK106" not in codes(doctor.check(m, x)) + codes(doctor.check(p, x))
