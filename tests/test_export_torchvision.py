"""Integer ONNX export of torchvision's real model definitions as users write them (weights=None,
no stubs, no FloatFunctional: ``x + y``, ``torch.cat``, ``F.relu``, ``flatten``, ``chunk``
become generated call-site operators): onnxruntime's integers equal the fixed-point model's in
every element of every output and layer, int8 and int16, with and without high-precision
outputs, on nash-e, bayes and bernoulli; and ``qatkit verify`` on one of them.

CI runs a subset (one model per construct, few configurations); ``pytest --sweep`` runs every
model in every configuration."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

pytest.importorskip("onnxruntime")

import qatkit as qk
from qatkit.export.verify import compare
from tests._tv_import import import_torchvision
from tests._tv_workflow import photos, settle_batch_norm

SIZE = 32  # small photos keep the models fast; the integers are compared, not the accuracy
MODELS = {  # name -> (torchvision namespace, builder)
    "resnet18": ("models", "resnet18"),  # out += identity, flatten
    "mobilenet_v2": ("models", "mobilenet_v2"),  # x + conv(x), adaptive_avg_pool2d, flatten
    "squeezenet1_1": ("models", "squeezenet1_1"),  # torch.cat, flatten of the output
    "shufflenet_v2_x1_0": ("models", "shufflenet_v2_x1_0"),  # chunk, channel shuffle, cat
    "mobilenet_v3_small": ("models", "mobilenet_v3_small"),  # scale * x (SE), hardswish
    "quantizable_resnet18": ("models.quantization", "resnet18"),  # FloatFunctional add_relu
}
CONFIGS = [(march, dtype, hp) for march in ("nash-e", "bayes", "bernoulli")
           for dtype in ("qint8", "qint16") for hp in (True, False)
           if (march, dtype) != ("bernoulli", "qint16")]  # bernoulli has int8 activations
# the CI subset: every model once, and every march, dtype and output mode somewhere in it
SUBSET = {("resnet18", "nash-e", "qint8", True), ("mobilenet_v2", "bayes", "qint16", False),
          ("squeezenet1_1", "bernoulli", "qint8", False),
          ("shufflenet_v2_x1_0", "nash-e", "qint16", True),
          ("mobilenet_v3_small", "bayes", "qint16", True),
          ("quantizable_resnet18", "bayes", "qint8", True)}


def build(name: str) -> torch.nn.Module:
    tv = import_torchvision()
    space, builder = MODELS[name]
    ns = tv.models.quantization if space == "models.quantization" else tv.models
    kwargs = {"quantize": False} if space == "models.quantization" else {}
    return getattr(ns, builder)(weights=None, **kwargs).eval()


def converted(name: str, march: str, dtype: str, hp: bool) -> tuple[torch.nn.Module,
                                                                      torch.Tensor]:
    """The calibrated fixed-point model of torchvision's definition, and test photos."""
    cal, x = calibrated(name, march, dtype, hp)
    with qk.set_march(march):
        return qk.convert(cal), x


def calibrated(name: str, march: str, dtype: str, hp: bool) -> tuple[torch.nn.Module,
                                                                       torch.Tensor]:
    """torchvision's definition prepared and calibrated on photos (VALIDATION state)."""
    torch.manual_seed(0)
    model = build(name)
    x = photos(SIZE, 4)
    settle_batch_norm(model, x)
    qc = dataclasses.replace(qk.default_calibration_qconfig(dtype), high_precision_output=hp)
    with qk.set_march(march), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-init weights: findings are not the point here
        cal = qk.prepare(model, x[:2], qconfig=qc)
        qk.calibrate(cal, [x[:2], x[2:]], progress=False)
    return cal, x


def _params() -> list:
    return [pytest.param(n, *c, id=f"{n}-{c[0]}-{c[1]}-{'hp' if c[2] else 'q'}",
                         marks=[] if (n, *c) in SUBSET else [pytest.mark.sweep])
            for n in MODELS for c in CONFIGS
            # bernoulli has no hardswish and no 5-d tensors (shufflenet's channel shuffle)
            if not (c[0] == "bernoulli" and n in ("mobilenet_v3_small", "shufflenet_v2_x1_0"))]


@pytest.mark.parametrize("name,march,dtype,hp", _params())
def test_torchvision_integer_export_identical(name, march, dtype, hp):
    q, x = converted(name, march, dtype, hp)
    ops = any(n.startswith("qatkit_ops.") for n, _ in q.named_modules())
    assert ops != name.startswith("quantizable")  # the plain definitions: call-site ops
    data = torch.cat([x, x[:1] * 8])  # and one photo far outside the calibrated range
    with qk.set_march(march):
        r = compare(qk.export_onnx(q, x[:2]), q, data)
    assert r["identical"], [z for z in r["outputs"] + r["layers"] if z["identical"] < 1][:3]
    assert len(r["layers"]) > 40  # every quantized layer compared, not only the output


TARGET = '''
from tests.test_export_torchvision import converted

def build():
    q, x = converted("squeezenet1_1", "bernoulli", "qint8", True)
    return q, x[:2]
'''


def test_cli_verify_torchvision(tmp_path, monkeypatch, capsys):
    """``qatkit export`` and ``qatkit verify`` as commands (in this process: the subprocess entry
    point is tests/test_export_checkpoint.py's), per layer the generated operators too."""
    from qatkit.cli.main import main
    (tmp_path / "target.py").write_text(TARGET)
    monkeypatch.chdir(tmp_path)
    assert main(["export", "target.py:build", "--output", "squeezenet.onnx"]) == 0
    torch.save(photos(SIZE, 4), tmp_path / "photos.pt")
    capsys.readouterr()
    code = main(["verify", "squeezenet.onnx", "target.py:build", "--data", "photos.pt"])
    out = capsys.readouterr().out
    assert code == 0 and out.strip().endswith("identical"), out
    assert "qatkit_ops." in out, out
