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


def _ort_requant_probe(op: str, act: str, seed: int = 5):
    """A DQ -> Conv/Gemm -> Q group over K = 1 (``acc = x * w[c] + b[c]``, every int8 ``x``),
    with biases chosen so that ``acc * s_in * s_w[c] / s_o`` lands within a float32 rounding of
    ``k + 1/2``: orders of evaluating the scale then give different integers."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(seed)
    f32 = np.float32
    s_in, s_o = f32(0.0173), f32(0.0517)
    xs = np.arange(-128, 128)

    def orders(acc, sw):  # the float32 order of the fused kernels, and the exact value
        return (np.round(acc.astype(f32) * ((s_in * sw) / s_o).astype(f32)),
                np.round(acc * (np.float64(s_in) * np.float64(sw) / np.float64(s_o))))

    w, b, s_w = [], [], []
    while len(w) < 64:  # channels where the two orders differ for some x, unsaturated
        sw, wc = f32(rng.uniform(1e-4, 1e-2)), int(rng.integers(1, 128)) * int(rng.choice([-1, 1]))
        k, x = int(rng.integers(-120, 120)), int(rng.choice(xs))
        bc = round((k + 0.5) / float((s_in * sw) / s_o)) - x * wc + int(rng.integers(-3, 4))
        a, e = orders(xs * wc + bc, sw)
        if (a != e).any() and np.abs(np.concatenate([a, e])).max() < 127:
            w.append(wc)
            s_w.append(sw)
            b.append(bc)
    w, b, s_w = np.array(w), np.array(b), np.array(s_w, f32)
    npd, zp, et = (np.uint8, 128, TensorProto.UINT8) if act == "u8" else (
        np.int8, 0, TensorProto.INT8)
    c = len(w)
    wshape, xshape = ((c, 1, 1, 1), [256, 1, 1, 1]) if op == "Conv" else ((c, 1), [256, 1])
    inits = [numpy_helper.from_array(v, n) for v, n in (
        (s_in, "s_in"), (np.array(zp, npd), "zp"), (w.reshape(wshape).astype(np.int8), "w"),
        (s_w, "s_w"), (np.zeros(c, np.int8), "zpw"), (b.astype(np.int32), "b"),
        ((s_in * s_w).astype(f32), "s_b"), (np.zeros(c, np.int32), "zpb"), (s_o, "s_o"))]
    nodes = [helper.make_node("DequantizeLinear", ["xq", "s_in", "zp"], ["x"]),
             helper.make_node("DequantizeLinear", ["w", "s_w", "zpw"], ["wf"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "s_b", "zpb"], ["bf"], axis=0),
             helper.make_node(op, ["x", "wf", "bf"], ["y"], **({} if op == "Conv" else
                                                                {"transB": 1})),
             helper.make_node("QuantizeLinear", ["y", "s_o", "zp"], ["yq"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("xq", et, xshape)],
                              [helper.make_tensor_value_info("yq", et, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    from qatkit.export.verify import session
    got = session(model).run(None, {"xq": (xs + zp).astype(npd).reshape(xshape)})[0]
    got = got.astype(np.int64).reshape(256, c) - zp
    want, other = orders(xs.reshape(-1, 1) * w.reshape(1, -1) + b.reshape(1, -1), s_w)
    return got, want, other  # numpy: float32 products, round half to even


@pytest.mark.parametrize("op,act", [("Conv", "u8"), ("Gemm", "u8"), ("Gemm", "s8")])
def test_onnxruntime_fused_requantization_is_float32(op, act):
    """What docs/export.md states of onnxruntime's fused QLinearConv/QGemm, which an
    onnxruntime-mirroring profile would build on: ``round_half_even(float32(acc) *
    float32(float32(s_in * s_w[c]) / s_o))`` on inputs where other evaluation orders of the
    same scale give other integers."""
    got, want, other = _ort_requant_probe(op, act)
    assert (want != other).sum() >= 64  # the probe tells the orders apart
    assert np.array_equal(got, want)
