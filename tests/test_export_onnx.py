"""Integer ONNX flavour: onnxruntime computes exactly qatkit's fixed-point integers."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("onnxruntime")
import onnx

import qatkit as qk
from bench.models import resnet18_like
from qatkit.base.errors import QatkitError
from qatkit.demo.recipe import DemoNet
from qatkit.export.verify import compare, session
from tests._export_models import AllOps, allops_inputs, prepared_and_converted


def _check(q, example, data):
    model = qk.export_onnx(q, example)
    onnx.checker.check_model(model, full_check=True)
    r = compare(model, q, data)
    assert r["identical"], [x for x in r["outputs"] + r["layers"] if x["identical"] < 1]
    assert r["layers"]  # per-layer integers were compared too
    return r


@pytest.mark.parametrize("march,dtype,hp,ct", [("nash-e", "qint8", True, True),
                                               ("bayes", "qint8", False, False),
                                               ("nash-e", "qint16", True, False),
                                               ("bayes", "qint16", False, True)])
def test_allops_identical(march, dtype, hp, ct):
    qc = dataclasses.replace(qk.default_calibration_qconfig(dtype), high_precision_output=hp)
    x = allops_inputs()
    _, q = prepared_and_converted(AllOps(conv_transpose=ct), x, march, qconfig=qc)
    kinds = {type(m).__name__ for m in q.modules()}
    assert {"QConv2d", "QLinear", "QLookupTable", "QClamp", "QAvgPool2d", "QUpsampleBilinear",
            "QFunctional", "QQuantStub", "QDeQuantStub"} <= kinds
    assert ("QConvTranspose2d" in kinds) == ct
    head = q.head
    assert head.output_mode == ("high_precision" if hp else "quantized")
    _check(q, x, allops_inputs(3, seed=5))  # another batch size: the batch axis is free


@pytest.mark.parametrize("march", ["nash-e", "bayes", "bernoulli"])
def test_demo_net_identical(march):
    x = torch.randn(2, 1, 8, 8)
    _, q = prepared_and_converted(DemoNet(10, 8), x, march)
    _check(q, x, torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("march", ["nash-e", "bernoulli"])
def test_bench_resnet18_like_identical(march):
    x = torch.randn(1, 3, 32, 32)
    _, q = prepared_and_converted(resnet18_like(10), x, march, batches=2)
    _check(q, x, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))


class _ConvT(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.quant, self.ct, self.dequant = qk.QuantStub(), nn.ConvTranspose2d(4, 6, **kw), \
            qk.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.ct(self.quant(x)))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(k=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 3),
       output_padding=st.integers(0, 2), dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       dtype=st.sampled_from(["qint8", "qint16"]), hp=st.booleans())
def test_conv_transpose_identical(k, stride, padding, output_padding, dilation, groups, dtype,
                                  hp):
    """ConvInteger on the zero-inserted input (negative pads crop): every geometry exact."""
    assume(output_padding < max(stride, dilation) and padding <= dilation * (k - 1) + 1)
    x = torch.randn(2, 4, 5, 6)
    qc = dataclasses.replace(qk.default_calibration_qconfig(dtype), high_precision_output=hp)
    _, q = prepared_and_converted(
        _ConvT(kernel_size=k, stride=stride, padding=padding, output_padding=output_padding,
               dilation=dilation, groups=groups), x, "bayes", qconfig=qc)
    _check(q, x, torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(4)))


class _Indexing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
        self.conv, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.dequant(self.conv2(self.conv(self.quant(x))[:, :2]))


@pytest.mark.parametrize("flavour", ["integer", "qdq"])
def test_unsupported_op_refused_with_its_name(flavour):
    x = torch.randn(2, 3, 4, 4)
    _, q = prepared_and_converted(_Indexing(), x, "nash-e")
    with pytest.raises(QatkitError, match=r"QK106.*'conv2'.*indexing"):
        qk.export_onnx(q, x, flavour=flavour)


def test_digits_accuracy_same_as_fixed_point(tmp_path):
    from qatkit.demo.recipe import accuracy, calibration_batches, centered, load, train_float
    from qatkit.quantization.calibrate import calibrate
    torch.manual_seed(0)
    split = load("digits")
    with qk.set_march("nash-e"):
        net = DemoNet(split.num_classes, 8)
        train_float(net, split, 2, 0, quiet=True)
        calib = qk.prepare(net, centered(split.x_train[:2]),
                           qconfig=qk.default_calibration_qconfig())
        calibrate(calib, calibration_batches(split, 256), progress=False)
        q = qk.convert(calib)
    path = str(tmp_path / "digits.onnx")
    qk.export_onnx(q, centered(split.x_train[:2]), path)
    out = session(path).run(["output_0"], {"input_0": centered(split.x_test).numpy()})[0]
    onnx_acc = float(np.mean(out.argmax(1) == split.y_test.numpy()))
    assert onnx_acc == accuracy(q, split.x_test, split.y_test)
    assert onnx_acc > 0.5


TARGET = '''
import torch
from tests._export_models import prepared_and_converted
from qatkit.demo.recipe import DemoNet

def build():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    return prepared_and_converted(DemoNet(10, 8), x, "nash-e")[1], x
'''


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-m", "qatkit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_export_and_verify(tmp_path):
    (tmp_path / "target.py").write_text(TARGET)
    out = tmp_path / "m.onnx"
    r = _cli("export", "target.py:build", "--output", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    torch.save(torch.randn(4, 1, 8, 8), tmp_path / "data.pt")
    r = _cli("verify", str(out), "target.py:build", "--data", "data.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical 100.0000%" in r.stdout
    r = _cli("verify", str(out), "target.py:nope", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    # a tampered file (one weight changed) must be reported as different: exit 1
    proto = onnx.load(str(out))
    w = next(t for t in proto.graph.initializer if t.name.startswith("w_"))
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] = 127 if arr.flat[0] != 127 else -127
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    r = _cli("verify", str(tmp_path / "bad.onnx"), "target.py:build", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
