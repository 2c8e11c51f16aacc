"""Torch calls in forward become operators, one per call site (qatkit/quantization/call_sites.py).

The strongest check: a model written with plain torch calls and no stubs gives, after prepare,
calibration and convert, exactly the integers of the same model written the old way (explicit
stubs, one FloatFunctional or module per call site), because each generated operator is that
FloatFunctional or module."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qatkit as qk
from qatkit.base.errors import QatkitError


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        se = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(out, 1)))))
        out = out * se
        out += x
        return out


class Functional(nn.Module):
    """Written as torchvision writes models: no stubs, torch calls in forward, a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for blk in self.blocks:
            x = blk(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([b, a * 0.5], 1)
        x = torch.cat([x.mean([2, 3]), F.adaptive_avg_pool2d(x, 1).flatten(1)], 1) / 2
        return self.fc(x.reshape(x.shape[0], -1)[:, :16])


class ExplicitBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.pool, self.relu, self.sig = nn.AdaptiveAvgPool2d(1), nn.ReLU(), nn.Sigmoid()
        self.mul, self.add = qk.FloatFunctional(), qk.FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        se = self.sig(self.fc2(self.relu(self.fc1(self.pool(out)))))
        return self.add.add(self.mul.mul(out, se), x)


class Explicit(nn.Module):
    """The same network written the old way."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.stem, self.relu = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()
        self.blocks = nn.ModuleList([ExplicitBlock(8), ExplicitBlock(8)])
        self.halve, self.cat1, self.cat2 = (qk.FloatFunctional() for _ in range(3))
        self.mean, self.div = qk.FloatFunctional(), qk.FloatFunctional()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(self.quant(x)))
        for blk in self.blocks:
            x = blk(x)
        a, b = x[:, :4], x[:, 4:]
        x = self.cat1.cat([b, self.halve.mul_scalar(a, 0.5)], 1)
        x = self.cat2.cat([self.mean.mean(x, [2, 3]), self.pool(x).flatten(1)], 1)
        x = self.div.mul_scalar(x, 0.5)
        return self.dequant(self.fc(x.reshape(x.shape[0], -1)[:, :16]))


def _same_weights(src: nn.Module, dst: nn.Module) -> None:
    own = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        own[name].data.copy_(p.data)


@pytest.fixture()
def data(digits):
    x = digits.x_train[:64]
    return x, [x[i:i + 16] for i in range(0, 64, 16)]


def _fixed_point(model: nn.Module, x: torch.Tensor, batches: list) -> nn.Module:
    cal = qk.prepare(model, x[:4], qconfig=qk.default_calibration_qconfig())
    qk.calibrate(cal, batches)
    return qk.convert(cal)


def test_generated_operators_equal_the_hand_written_ones(data) -> None:
    x, batches = data
    qk.set_march("nash-e")
    torch.manual_seed(0)
    functional, explicit = Functional().eval(), Explicit().eval()
    _same_weights(functional, explicit)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qk.QatkitWarning)  # a clean model: no warning at all
        a = _fixed_point(functional, x, batches)
    b = _fixed_point(explicit, x, batches)
    names = {n for n, _ in a.named_modules() if n.startswith("qatkit_ops.")}
    assert {"qatkit_ops.input_0", "qatkit_ops.output_0", "qatkit_ops.blocks.0.mul_0",
            "qatkit_ops.blocks.0.add_0", "qatkit_ops.blocks.1.add_0",
            "qatkit_ops.blocks.0.sigmoid_0", "qatkit_ops.blocks.0.adaptive_avg_pool2d_0",
            "qatkit_ops.cat_0", "qatkit_ops.cat_1", "qatkit_ops.mul_scalar_0",
            "qatkit_ops.mean_0", "qatkit_ops.mul_scalar_1"} <= names
    with torch.no_grad():
        got, want = a(x), b(x)
    assert torch.equal(got, want)  # the very same integers
    assert any(k.startswith("qatkit_ops.blocks.0.add_0.") for k in a.state_dict())


def test_checkpoint_rebuilds_the_generated_operators(data, tmp_path) -> None:
    x, batches = data
    qk.set_march("nash-e")
    torch.manual_seed(0)
    model = Functional().eval()
    fixed = _fixed_point(model, x, batches)
    qk.checkpoint.save(fixed, tmp_path / "f.pt")
    again = qk.load_quantized(Functional().eval(), tmp_path / "f.pt", x[:4])
    with torch.no_grad():
        assert torch.equal(again(x), fixed(x))


def test_qat_step_trains_through_generated_operators(data) -> None:
    x, _ = data
    qk.set_march("nash-e")
    qat = qk.prepare(Functional().eval(), x[:4], qconfig=qk.default_qat_qconfig()).train()
    before = qat.stem.weight.detach().clone()
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    qat(x[:8]).logsumexp(1).mean().backward()
    opt.step()
    assert not torch.equal(before, qat.stem.weight)
    assert qat.get_submodule("qatkit_ops.blocks.0.add_0").activation_post_process is not None


class Dense(nn.Module):
    """One line of code (densenet's torch.cat) in several owners, a helper method, a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.layers = nn.ModuleList(Layer(4 + 4 * i) for i in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.quant(x)]
        for layer in self.layers:
            feats.append(layer(feats))
        return self.dequant(torch.cat(feats, 1))


class Layer(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 1)

    def joined(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(feats, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv(self.joined(feats))
        for _ in range(2):  # two occurrences of one line: two operators
            x = x + 1.0
        return x


def test_one_operator_per_owner_and_occurrence() -> None:
    qk.set_march("nash-e")
    x = torch.randn(8, 4, 6, 6)
    cal = qk.prepare(Dense(), x, qconfig=qk.default_calibration_qconfig())
    names = {n for n, _ in cal.named_modules() if n.startswith("qatkit_ops.")}
    for i in range(3):
        assert {f"qatkit_ops.layers.{i}.cat_0", f"qatkit_ops.layers.{i}.add_scalar_0",
                f"qatkit_ops.layers.{i}.add_scalar_1"} <= names
    assert "qatkit_ops.cat_0" in names
    qk.calibrate(cal, [x])
    fixed = qk.convert(cal)
    with torch.no_grad():
        out = fixed(x)
    assert out.shape == (8, 16, 6, 6)
    assert (out - cal(x)).abs().max() < 0.25


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3), Swish()

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.mul_(0.5)  # the method form: y itself changes
        return self.act(y)[index]


def test_own_leaf_modules_in_place_methods_and_integer_inputs() -> None:
    qk.set_march("nash-e")
    x, index = torch.randn(6, 3, 8, 8), torch.tensor([0, 2])
    cal = qk.prepare(InPlace(), (x, index), qconfig=qk.default_calibration_qconfig())
    names = {n for n, _ in cal.named_modules() if n.startswith("qatkit_ops.")}
    assert {"qatkit_ops.input_0", "qatkit_ops.mul_scalar_0", "qatkit_ops.act.sigmoid_0",
            "qatkit_ops.act.mul_0"} <= names
    assert "qatkit_ops.input_1" not in names  # integer inputs stay as they are
    with torch.no_grad():
        ref = InPlace.forward(cal, x, index)
    qk.calibrate(cal, [(x, index)])
    fixed = qk.convert(cal)
    with torch.no_grad():
        got = fixed(x, index)
    assert got.shape == ref.shape == (2, 4, 6, 6)
    assert (got - cal(x, index)).abs().max() < 0.1


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.other, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)
        self.use_other = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.use_other:
            y = self.other(y)
        return self.head(y.mean([2, 3]))


def test_unreached_branch_warns_at_prepare_and_is_named_at_run_time() -> None:
    qk.set_march("nash-e")
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(qk.QatkitWarning, match=r"QK101.*'other'.*never called"):
        cal = qk.prepare(Branchy(), x, qconfig=qk.default_calibration_qconfig())
    qk.calibrate(cal, [x])
    fixed = qk.convert(cal)
    fixed(x)  # the branch the example inputs took works
    fixed.use_other = True
    with pytest.raises(QatkitError, match=r"QK008.*Conv2d 'other'.*no example input"):
        fixed(x)


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.conv(x)


def test_a_call_without_operator_is_refused_with_its_line() -> None:
    qk.set_march("nash-e")
    with pytest.raises(QatkitError, match=r"QK102.*__rsub__\(\) at test_call_sites.py:\d+.*"
                       r"a scalar minus a tensor"):
        qk.prepare(Odd(), torch.randn(2, 3, 8, 8), qconfig=qk.default_calibration_qconfig())


class Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.size = nn.Conv2d(3, 4, 3), 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.conv(x), self.size).flatten(1)


def test_changed_call_arguments_are_refused() -> None:
    qk.set_march("nash-e")
    x = torch.randn(2, 3, 8, 8)
    cal = qk.prepare(Pool(), x, qconfig=qk.default_calibration_qconfig())
    cal.size = 3
    with pytest.raises(QatkitError, match=r"other arguments than at prepare"):
        cal(x)


def test_sequential_root_and_models_without_torch_calls_are_unchanged() -> None:
    qk.set_march("nash-e")
    x = torch.randn(2, 3, 8, 8)
    seq = nn.Sequential(qk.QuantStub(), nn.Conv2d(3, 4, 3), nn.ReLU(), qk.DeQuantStub())
    cal = qk.prepare(seq, x, qconfig=qk.default_calibration_qconfig())
    assert not hasattr(cal, "qatkit_ops")  # stubs given, no torch calls: nothing generated
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    cal = qk.prepare(plain, x, qconfig=qk.default_calibration_qconfig())
    qk.calibrate(cal, [x])
    out = qk.convert(cal)(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2)


def test_scale_keeping_calls_move_the_integers_unchanged() -> None:
    """chunk/split/repeat/expand/zero pad/adaptive max pool on a QTensor: the integers of the
    same call on ``q``, the scale carried (any other pad value is refused)."""
    from qatkit.base.qtensor import QTensor
    q = torch.randint(-128, 128, (2, 4, 5, 6), dtype=torch.int8)
    x = QTensor(q, torch.tensor(0.1), "qint8")
    for got, want in ((x.chunk(2, 1), q.chunk(2, 1)), (x.split([1, 3], 1), q.split([1, 3], 1))):
        assert all(torch.equal(g.q, w) and g.scale == x.scale for g, w in zip(got, want))
    assert torch.equal(x.repeat(1, 2, 1, 1).q, q.repeat(1, 2, 1, 1))
    assert torch.equal(x[:, :1].expand(2, 3, 5, 6).q, q[:, :1].expand(2, 3, 5, 6))
    assert torch.equal(F.pad(x, (1, 2)).q, F.pad(q, (1, 2)))
    assert torch.equal(F.adaptive_max_pool2d(x, 2).q,
                       F.adaptive_max_pool2d(q.float(), 2).to(torch.int8))
    with pytest.raises(QatkitError, match=r"QK102.*only zero padding"):
        F.pad(x, (1, 1), value=1.0)
