"""QDQ ONNX flavour: a valid standard QDQ graph (onnx full check, onnxruntime), its encodings,
and how far onnxruntime's arithmetic is from qatkit's fixed point (measured, per layer)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx
from onnx import numpy_helper

import qatkit as qk
from qatkit.demo.recipe import DemoNet
from qatkit.export import encodings_path
from qatkit.export.verify import compare
from tests._export_models import AllOps, allops_inputs, prepared_and_converted


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_demo_net_qdq_structure_encodings_and_distance(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    _, q = prepared_and_converted(DemoNet(10, 8), x, "nash-e")
    path = str(tmp_path / "d.onnx")
    model = qk.export_onnx(q, x, path, flavour="qdq")
    onnx.checker.check_model(model, full_check=True)
    kinds = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= kinds
    assert not kinds & {"ConvInteger", "MatMulInteger", "Mod"}
    inits = _inits(model)
    with open(encodings_path(path)) as fh:
        enc = json.loads(fh.read())
    assert enc["march"] == "nash-e" and enc == {
        **json.loads(dict((p.key, p.value) for p in model.metadata_props)["qatkit.encodings"]),
        "march": "nash-e", "model": "d.onnx"}
    # every QuantizeLinear output has an activation encoding with the fixed-point scale
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            e = enc["activation_encodings"][n.output[0]]
            assert e["scale"] == [float(inits[n.input[1]])] and e["dtype"] == "int8"
            assert inits[n.input[2]].dtype == np.int8 and inits[n.input[2]] == 0
    # conv1: int8 weights per channel on axis 0, int32 bias at s_in * s_w
    conv1 = q.conv1
    params = enc["param_encodings"].values()
    w = next(v for v in params if v["layer"] == "conv1" and v["dtype"] == "int8")
    assert w["axis"] == 0 and w["scale"] == conv1.weight_scale.tolist()
    b = next(v for v in params if v["layer"] == "conv1" and v["dtype"] == "int32")
    s_in = q.quant.out_scale.double()
    want = (s_in * conv1.weight_scale.double()).float()
    assert b["scale"] == want.tolist()
    weights = [a for k, a in inits.items() if k.startswith("conv1.weight")]
    assert len(weights) == 1 and weights[0].dtype == np.int8
    assert np.array_equal(weights[0], conv1.weight.numpy())
    # measured distance to qatkit's integers: the input quantizer is exact; the float32
    # requantization of onnxruntime differs by at most a few LSBs in a few elements
    r = compare(model, q, torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3)))
    layers = {row["name"]: row for row in r["layers"]}
    assert layers["quant"]["identical"] == 1.0
    assert all(row["identical"] > 0.9 and row["max_lsb"] <= 4 for row in r["layers"])
    assert r["outputs"][0]["agree"] >= 0.75


@pytest.mark.parametrize("march,dtype", [("nash-e", "qint8"), ("bayes", "qint16")])
def test_allops_qdq_valid_and_close(march, dtype):
    qc = dataclasses.replace(qk.default_calibration_qconfig(dtype), high_precision_output=True)
    x = allops_inputs()
    _, q = prepared_and_converted(AllOps(conv_transpose=False), x, march, qconfig=qc)
    model = qk.export_onnx(q, x, flavour="qdq")
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == (21 if dtype == "qint16" else 17)
    r = compare(model, q, allops_inputs(3, seed=5))  # loads and runs in onnxruntime
    layers = {row["name"]: row for row in r["layers"]}
    assert layers["quant"]["identical"] == layers["quant2"]["identical"] == 1.0
    assert np.mean([row["identical"] for row in r["layers"]]) > 0.5


def test_cli_qdq_writes_sidecar_and_verify_reports(tmp_path):
    (tmp_path / "target.py").write_text(
        "import torch\nfrom tests._export_models import prepared_and_converted\n"
        "from qatkit.demo.recipe import DemoNet\n\ndef build():\n    torch.manual_seed(0)\n"
        "    x = torch.randn(4, 1, 8, 8)\n"
        "    return prepared_and_converted(DemoNet(10, 8), x, 'nash-e')[1], x\n")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = tmp_path / "m.onnx"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "qatkit", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    r = cli("export", "target.py:build", "--output", str(out), "--flavour", "qdq")
    assert r.returncode == 0, r.stderr
    assert out.is_file() and (tmp_path / "m.encodings.json").is_file()
    r = cli("verify", str(out), "target.py:build", "--json")
    assert r.returncode == 0, r.stderr  # a qdq file may differ: a report, not a failure
    rep = json.loads(r.stdout)
    assert rep["flavour"] == "qdq" and {x["name"] for x in rep["layers"]} >= {"quant", "conv1"}
