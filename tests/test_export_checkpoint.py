"""``qatkit export/verify ... --checkpoint PATH``: FUNC gives the float model and example
inputs, the fixed-point model is rebuilt from the checkpoint (qk.load_quantized), end to end
through the command line on a saved checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("onnxruntime")

import qatkit as qk
from qatkit.cli.main import main
from qatkit.quantization import checkpoint
from tests._export_models import prepared_and_converted

TARGET = '''
import torch
from qatkit.demo.recipe import DemoNet

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))

def float_model():
    return DemoNet(10, 8), X

def builder():
    return (lambda: DemoNet(10, 8)), X

def not_a_model():
    return 3, X
'''
CONVERTED = '''
def converted():
    from tests._export_models import prepared_and_converted
    return prepared_and_converted(DemoNet(10, 8), X, "bayes")[1], X
'''


@pytest.fixture()
def saved(tmp_path):
    """target.py, the checkpoints of two fixed-point models (different calibration data) and
    of a calibrated model, and a data file."""
    from qatkit.demo.recipe import DemoNet
    x = torch.randn(2, 1, 8, 8)
    calib, q = prepared_and_converted(DemoNet(10, 8), x, "bayes", seed=0)
    checkpoint.save(q, tmp_path / "q.pt")
    checkpoint.save(prepared_and_converted(DemoNet(10, 8), x, "bayes", seed=1)[1],
                    tmp_path / "other.pt")
    checkpoint.save(calib, tmp_path / "calib.pt")
    (tmp_path / "target.py").write_text(TARGET + CONVERTED)
    torch.save(torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)),
               tmp_path / "data.pt")
    return SimpleNamespace(dir=tmp_path, fixed=q, example=x)


def _main(cwd, *args):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return main(list(args))
    finally:
        os.chdir(old)


def test_export_and_verify_from_a_checkpoint(saved, capsys):
    d = saved.dir
    onnx_path = str(d / "m.onnx")
    assert _main(d, "export", "target.py:float_model", "--checkpoint", "q.pt",
                 "--output", onnx_path) == 0
    capsys.readouterr()
    # a fresh process rebuilds the fixed-point model from the float class and the checkpoint
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "qatkit", "verify", onnx_path,
                        "target.py:builder", "--checkpoint", "q.pt", "--data", "data.pt",
                        "--json"], cwd=d, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["identical"] and rep["flavour"] == "integer"
    assert {row["name"] for row in rep["layers"]} >= {"quant", "conv1"}
    # the same file against another fixed-point model's checkpoint: it differs, exit 1
    assert _main(d, "verify", onnx_path, "target.py:float_model", "--checkpoint",
                 "other.pt") == 1
    assert "DIFFERENT" in capsys.readouterr().out
    # the file made from the checkpoint is the file of the model that was saved
    with open(onnx_path, "rb") as fh:
        assert fh.read() == qk.export_onnx(saved.fixed, saved.example).SerializeToString()


def test_checkpoint_mistakes_are_clear(saved, capsys):
    d = saved.dir
    out = str(d / "m.onnx")

    def err(*args):
        code = _main(d, *args)
        return code, capsys.readouterr().err.strip()

    code, msg = err("export", "target.py:float_model", "--checkpoint", "nope.pt", "--output",
                    out)
    assert code == 2 and "no such file: nope.pt" in msg and len(msg.splitlines()) == 1
    code, msg = err("export", "target.py:not_a_model", "--checkpoint", "q.pt", "--output", out)
    assert code == 2 and "(float_model, example_inputs)" in msg
    code, msg = err("export", "target.py:float_model", "--checkpoint", "calib.pt", "--output",
                    out)
    assert code == 1 and "QK000" in msg and "not a fixed-point one" in msg
    code, msg = err("export", "target.py:converted", "--checkpoint", "q.pt", "--output", out)
    assert code == 2 and "returned a converted one" in msg
    assert not os.path.exists(out)
