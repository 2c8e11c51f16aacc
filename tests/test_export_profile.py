"""The onnxruntime target profile (qk.convert(..., profile="onnxruntime")): conv/linear
requantize as onnxruntime's fused kernels do, so the qdq export of such a model is identical in
onnxruntime, per layer; everything the profile does not mirror is refused; the default
arithmetic is untouched."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnxruntime")
import numpy as np
import onnx

import qatkit as qk
from qatkit.base.errors import QatkitError
from qatkit.export.verify import compare
from tests._export_models import AllOps, ProfileNet, allops_inputs, calibrated

QUANTIZED = dataclasses.replace(qk.default_calibration_qconfig(), high_precision_output=False)


def _data(seed: int = 3) -> torch.Tensor:
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    x[1] = 0.0
    x[2] *= 8.0  # saturation everywhere
    return x


def _fused(model) -> set[str]:
    """The op types onnxruntime runs after its graph optimizations."""
    import tempfile

    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), opts,
                             providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}


@pytest.mark.parametrize("march,level", [("nash-e", 0), ("bayes", 0), ("nash-e", 1)])
def test_profile_qdq_identical_in_onnxruntime(march, level):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    with qk.set_march(march), qk.set_consistency_level(level):
        calib = calibrated(ProfileNet(), x, march, QUANTIZED)
        q = qk.convert(calib, profile="onnxruntime")
        default = qk.convert(calib)
    assert {n for n, m in q.named_modules() if getattr(m, "profile", None)} == {
        "conv1", "dw", "conv3", "fc"}
    model = qk.export_onnx(q, x, flavour="qdq")
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["qatkit.profile"] == "onnxruntime"
    # weights as uint8 with zero point 128 (u8u8 groups: exact without VNNI), the same values
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    (w,) = [v for k, v in inits.items() if k.startswith("conv1.weight")]
    assert w.dtype == np.uint8 and np.array_equal(w.astype(np.int16) - 128, q.conv1.weight.numpy())
    enc = json.loads(props["qatkit.encodings"])["param_encodings"]
    assert {(e["dtype"], e["offset"][0]) for e in enc.values() if e["bitwidth"] == 8} == {
        ("uint8", -128)}
    assert {"QLinearConv", "QGemm"} <= _fused(model)  # every conv/linear group is fused
    assert not _fused(model) & {"Conv", "Gemm", "FusedConv"}
    r = compare(model, q, _data())
    assert r["identical"], [x for x in r["outputs"] + r["layers"] if x["identical"] < 1]
    assert {"quant", "conv1", "dw", "pool", "conv3", "fc"} <= {x["name"] for x in r["layers"]}
    # the default arithmetic is another one: its qdq file is not identical (the check can fail)
    assert not compare(qk.export_onnx(default, x, flavour="qdq"), default, _data())["identical"]


def test_profile_refusals():
    torch.manual_seed(0)
    x = allops_inputs()
    calib = calibrated(AllOps(conv_transpose=False), x, "nash-e", QUANTIZED)
    with qk.set_march("nash-e"), pytest.raises(QatkitError, match=r"QK106.*profile 'onnxrun"
                                               r"time'.*QLookupTable 'sig'"):
        qk.convert(calib, profile="onnxruntime")
    with pytest.raises(QatkitError, match=r"QK000.*unknown target profile 'tensorrt'"):
        qk.convert(calib, profile="tensorrt")
    xs = torch.randn(2, 3, 8, 8)
    for qc, what in ((qk.default_calibration_qconfig("qint16"), "qint16 outputs"),
                     (dataclasses.replace(QUANTIZED, high_precision_output=True),
                      "high-precision output")):
        c = calibrated(ProfileNet(), xs, "nash-e", qc)
        with qk.set_march("nash-e"), pytest.raises(QatkitError, match=what):
            qk.convert(c, profile="onnxruntime")


class _Linear3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.fc, self.dequant = qk.QuantStub(), nn.Linear(4, 3), qk.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.fc(self.quant(x)))


def test_profile_linear_on_3d_input_refused_at_export():
    x = torch.randn(2, 5, 4)
    calib = calibrated(_Linear3d(), x, "nash-e", QUANTIZED)
    with qk.set_march("nash-e"):
        q = qk.convert(calib, profile="onnxruntime")
    with pytest.raises(QatkitError, match=r"QK106.*'fc'.*2-d Gemm"):
        qk.export_onnx(q, x, flavour="qdq")
    assert compare(qk.export_onnx(q, x), q, x)["identical"]  # the integer flavour: exact


TARGET = '''
import dataclasses
import torch
import qatkit as qk
from tests._export_models import ProfileNet, calibrated

def build():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    qc = dataclasses.replace(qk.default_calibration_qconfig(), high_precision_output=False)
    calib = calibrated(ProfileNet(), x, "nash-e", qc)
    with qk.set_march("nash-e"):
        return qk.convert(calib, profile="onnxruntime"), x
'''


def test_cli_verify_expects_identity_for_profile_files(tmp_path):
    (tmp_path / "target.py").write_text(TARGET)
    env = dict(os.environ, PYTHONPATH=os.getcwd())

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "qatkit", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "p.onnx"
    r = cli("export", "target.py:build", "--output", str(out), "--flavour", "qdq")
    assert r.returncode == 0, r.stderr
    torch.save(_data(), tmp_path / "data.pt")
    r = cli("verify", str(out), "target.py:build", "--data", "data.pt")
    assert r.returncode == 0 and r.stdout.strip().endswith("identical"), r.stdout + r.stderr
    # one weight changed: a profile file that differs is an error, as for the integer flavour
    proto = onnx.load(str(out))
    w = next(t for t in proto.graph.initializer if t.name.startswith("conv1.weight"))
    arr = onnx.numpy_helper.to_array(w).copy()
    top = np.iinfo(arr.dtype).max  # uint8 with zero point 128 in the profile
    arr.flat[0] = top if arr.flat[0] != top else top - 100
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    r = cli("verify", str(tmp_path / "bad.onnx"), "target.py:build", "--data", "data.pt")
    assert r.returncode == 1 and "DIFFERENT" in r.stdout, r.stdout + r.stderr
