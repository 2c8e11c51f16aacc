"""Fusion by data flow: through nn.Identity / Dropout, and conv+add with the conv as either
operand of the add.

Each case checks the fused module types and that the fused float model computes what the
unfused one does (eval mode); the operand-order cases also go through prepare -> convert and
compare the fixed-point integers with the NumPy reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.quantization.fused import FusedConv2d, FusedLinear
from tests import _bitexact as B
from tests._tv_import import import_torchvision
from tests.reference import npref as R


def _warm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BN statistics and affine parameters that are not the identity."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def _fused(model: nn.Module, x: torch.Tensor) -> nn.Module:
    fused = qk.fuse(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    return fused


class Chain(nn.Module):
    """conv -> (between) -> BN -> (after) -> act, as ``nn.Sequential`` would run it."""

    def __init__(self, between: list[nn.Module], after: list[nn.Module], act: nn.Module
                 ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.between = nn.Sequential(*between)
        self.bn = nn.BatchNorm2d(8)
        self.after = nn.Sequential(*after)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.after(self.bn(self.between(self.conv(x)))))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("between,after,act", [
    ([nn.Identity()], [nn.Identity()], nn.ReLU()),
    ([nn.Identity(), nn.Identity()], [nn.Dropout(0.3)], nn.ReLU()),
    ([], [nn.Dropout2d(0.1), nn.Identity()], nn.ReLU()),
    ([nn.Identity()], [nn.Identity()], nn.ReLU6()),
], ids=["identity-identity-relu", "identities-dropout-relu", "dropout2d-identity-relu",
        "identity-identity-relu6"])
def test_chain_fuses_through_identity_and_dropout(between: list[nn.Module],
                                                  after: list[nn.Module], act: nn.Module
                                                  ) -> None:
    x = _x()
    f = _fused(_warm(Chain(between, after, act), x), x)
    assert type(f.conv) is FusedConv2d
    assert f.conv.activation == ("relu" if isinstance(act, nn.ReLU) else "relu6")
    assert type(f.bn) is nn.Identity and type(f.act) is nn.Identity
    # the pass-through modules stay (a Dropout still drops in training)
    assert [type(m) for m in f.after] == [type(m) for m in after]


def test_dropout_before_relu_commutes_in_training() -> None:
    """The reason Dropout may be crossed before a ReLU: relu(dropout(y)) == dropout(relu(y))
    with the same mask, so the fused model trains the same function."""

    class ConvDropRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.drop, self.relu = nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.drop(self.conv(x)))

    x = _x()
    m = ConvDropRelu().eval()
    f = _fused(m, x)
    assert f.conv.activation == "relu" and type(f.relu) is nn.Identity
    m.train(), f.train()
    torch.manual_seed(5)
    a = m(x)
    torch.manual_seed(5)
    b = f(x)
    torch.testing.assert_close(a, b)
    assert (a == 0).float().mean() > 0.3  # dropout really dropped


@pytest.mark.parametrize("between,after,act,why", [
    ([nn.Dropout(0.2)], [], nn.ReLU(), "dropout between conv and BN"),
    ([], [nn.Dropout(0.2)], nn.ReLU6(), "dropout before ReLU6"),
])
def test_dropout_stops_fusions_it_does_not_commute_with(
        between: list[nn.Module], after: list[nn.Module], act: nn.Module, why: str) -> None:
    x = _x()
    f = _fused(_warm(Chain(between, after, act), x), x)
    if between:  # BN not folded into the conv: it becomes a standalone per-channel affine
        assert type(f.conv) is FusedConv2d and f.conv.activation is None
        assert getattr(f.bn, "user_type", None) == "BatchNorm2d"
    else:  # BN folded, ReLU6 kept
        assert type(f.bn) is nn.Identity and f.conv.activation is None
        assert type(f.act) is nn.ReLU6


def test_identity_shared_by_two_chains() -> None:
    """One Identity instance on two paths is no obstacle: it is never replaced."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1, self.r1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
            self.c2, self.b2, self.r2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
            self.skip = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.r1(self.skip(self.b1(self.skip(self.c1(x)))))
            return self.r2(self.b2(self.skip(self.c2(x))))

    x = _x()
    f = _fused(_warm(Two(), x), x)
    assert f.c1.activation == "relu" and f.c2.activation == "relu"
    assert all(type(getattr(f, n)) is nn.Identity for n in ("b1", "r1", "b2", "r2"))


def test_linear_relu_through_dropout() -> None:
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 10), nn.Dropout(0.5), nn.ReLU()).eval()
    f = _fused(m, _x())
    assert type(f[1]) is FusedLinear and f[1].activation == "relu"
    assert type(f[2]) is nn.Dropout and type(f[3]) is nn.Identity


def test_output_in_the_middle_stops_fusion() -> None:
    """A value the model also returns cannot be fused past (the output would change)."""

    class Tap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.id, self.relu = nn.Conv2d(3, 4, 1), nn.Identity(), nn.ReLU()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.id(self.conv(x))
            return y, self.relu(y)

    x = _x()
    f = qk.fuse(Tap().eval(), x)
    assert f.conv.activation is None and type(f.relu) is nn.ReLU


# --------------------------------------------------------------------------- conv + add


class ConvAdd(nn.Module):
    """``add(x, bn(conv(x)))`` or ``add(bn(conv(x)), x)`` (+ReLU), optionally through an
    Identity, with a FloatFunctional ``add`` or ``add_relu``."""

    def __init__(self, conv_first: bool, op: str = "add", relu: bool = True,
                 identity: bool = False) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.c0, self.b0, self.r0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.id = nn.Identity() if identity else None
        self.ff, self.relu = qk.FloatFunctional(), nn.ReLU() if relu else nn.Identity()
        self.conv_first, self.op = conv_first, op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r0(self.b0(self.c0(self.quant(x))))
        y = self.bn(self.conv(x))
        if self.id is not None:
            y = self.id(y)
        a, b = (y, x) if self.conv_first else (x, y)
        return self.dequant(self.relu(getattr(self.ff, self.op)(a, b)))


@pytest.mark.parametrize("conv_first", [True, False], ids=["conv-first", "conv-second"])
@pytest.mark.parametrize("op,identity", [("add", False), ("add", True), ("add_relu", False)])
def test_conv_add_fuses_either_operand(conv_first: bool, op: str, identity: bool) -> None:
    x = _x()
    m = _warm(ConvAdd(conv_first, op, relu=op == "add", identity=identity), x)
    f = _fused(m, x)
    assert type(f.conv) is FusedConv2d and f.conv.feeds_add and f.conv.activation is None
    assert type(f.bn) is nn.Identity
    assert not f.c0.feeds_add and f.c0.activation == "relu"  # its output has two consumers
    if op == "add":
        assert f.ff.fused_activation == "relu" and type(f.relu) is nn.Identity
    else:
        assert f.ff.fused_activation is None


class TwoConvAdd(nn.Module):
    """Both operands of the add are conv outputs; ``second_runs_first`` computes the second
    operand before the first (as torchvision's BasicBlock computes its downsample first)."""

    def __init__(self, second_runs_first: bool) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.ca, self.ba = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.cb, self.bb = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.ff, self.relu = qk.FloatFunctional(), nn.ReLU()
        self.second_runs_first = second_runs_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        if self.second_runs_first:
            b = self.bb(self.cb(x))
            a = self.ba(self.ca(x))
        else:
            a = self.ba(self.ca(x))
            b = self.bb(self.cb(x))
        return self.dequant(self.relu(self.ff.add(a, b)))


@pytest.mark.parametrize("second_runs_first", [False, True])
def test_two_convs_into_one_add_fuse_the_first_operand(second_runs_first: bool) -> None:
    """One accumulator per add, chosen by operand position, not by execution order."""
    x = _x()
    f = _fused(_warm(TwoConvAdd(second_runs_first), x), x)
    assert f.ca.feeds_add and not f.cb.feeds_add
    assert f.ff.fused_activation == "relu"


def test_float_functional_called_twice_is_not_fused() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.ff = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), qk.FloatFunctional()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ff.add(x, self.c2(self.ff.add(x, self.c1(x))))

    f = qk.fuse(Shared().eval(), _x())
    assert not f.c1.feeds_add and not f.c2.feeds_add


@pytest.mark.parametrize("conv_first", [True, False], ids=["conv-first", "conv-second"])
@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_conv_add_fixed_point_is_bit_exact(conv_first: bool, dtype: str) -> None:
    """The accumulator enters the add as either operand: the integers equal the reference's
    add of the int32 accumulator (its per-channel scale s_in * s_w) and the other operand."""
    x = _x() * 2
    m = _warm(ConvAdd(conv_first), x)
    p, c = B.build(m, x, {"quant": 2**-5, "c0": 2**-5 * 0.75, "ff": 0.05}, B.qconfig(dtype))
    assert c.conv.output_mode == "accumulator" and c.c0.output_mode == "quantized"

    def wb(mod: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        return mod.weight.detach().numpy(), mod.bias.detach().numpy()

    s0, s1, s_add = (float(c.quant.out_scale), float(c.c0.out_scale), float(c.ff.out_scale))
    sw0, sw = c.c0.weight_scale.numpy(), c.conv.weight_scale.numpy()
    q = R.quantize(x.numpy(), s0, dtype)
    q1 = R.conv2d(q, s0, *wb(p.c0), sw0, s1, dtype, padding=1, activation="relu")
    acc = R.conv2d(q1, s1, *wb(p.conv), sw, 1.0, "qint32", padding=1, mode="accumulator")
    s_acc = R.accumulator_scale(s1, sw)
    if conv_first:
        want = R.add(acc, s_acc, q1, s1, s_add, dtype, relu=True, axis_a=1)
    else:
        want = R.add(q1, s1, acc, s_acc, s_add, dtype, relu=True, axis_b=1)
    with B.capture_dequant_input(c) as got, torch.no_grad():
        c(x)
    B.assert_ints(got[0], want, dtype, s_add, "conv + add")


def test_torchvision_quantizable_mobilenet_v2_fuses_every_residual_add() -> None:
    """torchvision's own quantizable MobileNetV2 writes ``skip_add.add(x, self.conv(x))``: the
    conv is the second operand. Every residual add now takes its block's last conv."""
    tv = import_torchvision()
    torch.manual_seed(0)
    m = tv.models.quantization.mobilenet_v2(weights=None, quantize=False).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    f = _fused(m, x)
    blocks = [n for n, mod in m.named_modules() if getattr(mod, "use_res_connect", False)]
    assert len(blocks) == 10
    for n in blocks:
        last = f.get_submodule(n).conv[-2]  # the linear bottleneck's conv (BN folded in)
        assert type(last) is FusedConv2d and last.feeds_add, n
