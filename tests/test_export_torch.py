"""torch.export.export on prepared (VALIDATION) and converted models: same numbers as eager."""

from __future__ import annotations

import pytest
import torch

import qatkit as qk
from qatkit.base.errors import QatkitError
from qatkit.demo.recipe import DemoNet
from tests._export_models import AllOps, allops_inputs, prepared_and_converted


def _same(a, b) -> bool:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("march", ["nash-e", "bayes"])
def test_allops_export(march: str) -> None:
    x = allops_inputs()
    prepared, converted = prepared_and_converted(AllOps(), x, march)
    for m in (prepared, converted):
        ep = torch.export.export(m, x)
        x2 = allops_inputs(seed=1)
        assert _same(ep.module()(*x2), m(*x2))


def test_demo_export_bernoulli_fresh_convert() -> None:
    """Exported straight after convert (no eager call before): constants come from the real
    buffers, not the tracer's fake ones."""
    x = torch.randn(3, 1, 8, 8)
    prepared, converted = prepared_and_converted(DemoNet(10, 8), x, "bernoulli")
    ep = torch.export.export(converted, (x,))
    assert _same(ep.module()(x), converted(x))
    assert _same(torch.export.export(prepared, (x,)).module()(x), prepared(x))


def test_export_refuses_calibration_state() -> None:
    x = torch.randn(2, 1, 8, 8)
    with qk.set_march("nash-e"):
        calib = qk.prepare(DemoNet(10, 8), x, qconfig=qk.default_calibration_qconfig())
    calib.eval()
    qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
    with pytest.raises(QatkitError, match="VALIDATION"):
        torch.export.export(calib, (x,))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", pytest.param(
    "shufflenet_v2_x1_0", marks=pytest.mark.sweep)])  # chunk on a QTensor: in the sweep
def test_torchvision_call_site_operators_export(name: str) -> None:
    """torchvision's definitions as written (generated call-site operators for x + y,
    torch.cat, chunk, scale * x): the exported prepared and converted programs give exactly
    eager's numbers on other photos (mobilenet_v3's 1x1 conv on a depthwise conv's output once
    gave other integers: a strided view the exported program did not keep)."""
    from tests.test_export_torchvision import calibrated
    prepared, x = calibrated(name, "nash-e", "qint8", True)
    with qk.set_march("nash-e"):
        converted = qk.convert(prepared)
    assert any(n.startswith("qatkit_ops.") for n, _ in converted.named_modules())
    for m in (prepared, converted):
        ep = torch.export.export(m, (x[:2],))
        assert _same(ep.module()(x[2:]), m(x[2:]))
