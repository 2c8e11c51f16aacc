"""Output that fits a terminal: tables at 80 columns with whole identifiers, the summary, the
command's entry points."""

import json
import os
import subprocess
import sys
from pathlib import Path

import qatkit as qk
from qatkit.base.table import render
from qatkit.demo.recipe import DemoNet, calibration_batches, centered
from qatkit.quantization.registry import ALL_KINDS

REPO = Path(__file__).resolve().parents[1]


def _qatkit(*args, columns=80, cwd=REPO):
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "qatkit", *args], capture_output=True,
                          text=True, timeout=180, env=env, cwd=cwd)


def test_table_wraps_at_spaces_only():
    rows = [["conv_transpose2d_with_a_long_name", "a b c d e f g h i j k l m n o p"]]
    text = render(("kind", "words"), rows, width=30)
    assert "conv_transpose2d_with_a_long_name" in text
    assert all(len(line) <= 40 for line in text.splitlines())


def test_marches_and_doctor_fit_80_columns_with_whole_identifiers():
    out = _qatkit("marches")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    words = set(out.stdout.replace(",", " ").split())
    for r in json.loads(_qatkit("marches", "--json").stdout):
        assert r["march"] in words and set(r["unsupported_ops"]) <= words
    doc = _qatkit("doctor", "examples/broken.py:make_broken", "--processor", "J6E")
    assert doc.returncode == 1, doc.stderr
    assert max(map(len, doc.stdout.splitlines())) <= 80, doc.stdout
    found = json.loads(_qatkit("doctor", "examples/broken.py:make_broken", "--processor", "J6E",
                               "--format", "json").stdout)["findings"]
    tokens = set(doc.stdout.split())
    for f in found:  # every word of every message and fix is printed whole
        assert set(f["fix"].split()) <= tokens, f["fix"]
        assert set(f["message"].split()) <= tokens


def test_summary_rows_and_command(digits):
    x = centered(digits.x_train[:2])
    with qk.set_march("bernoulli"):
        calib = qk.prepare(DemoNet(10, width=8), x, qconfig=qk.default_calibration_qconfig())
        qk.calibrate(calib, calibration_batches(digits, n=128))
        fixed = qk.convert(calib)
    for model in (calib, fixed):
        rows = {r.name: r for r in qk.summary(model, x)}
        assert rows["quant"].kind == "quant_stub" and rows["quant"].dtype_in == "float32"
        assert rows["conv1"].kind in ALL_KINDS and rows["conv1"].dtype_in == "qint8"
        assert rows["conv1"].weight_dtype == "qint8" and rows["conv1"].scale > 0
        lo, hi = rows["conv1"].weight_scale
        assert 0 < lo <= hi
        assert rows["fc"].high_precision and rows["fc"].dtype_out == "qint32"
        assert not rows["conv1"].high_precision
        assert all(r.qconfig == "global" and r.march == "yes" for r in rows.values())
        fq = calib.conv2.activation_post_process
        assert rows["conv2"].scale == float(fq.scale)
    out = _qatkit("summary", "examples/broken.py:make_fixed", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["stage"] == "prepared" and {"quant", "head"} <= {x["name"] for x in r["rows"]}
    text = _qatkit("summary", "examples/broken.py:make_fixed")
    assert max(map(len, text.stdout.splitlines())) <= 80 and "model.qconfig" in text.stdout


def test_entry_points_and_bench_only_where_installed(tmp_path):
    ver = _qatkit("--version")
    assert ver.returncode == 0 and ver.stdout.strip() == f"qatkit {qk.__version__}"
    assert "bench" in _qatkit("--help").stdout  # from the checkout: offered
    # as installed from a wheel (the package without the repository's bench/): not offered
    site = tmp_path / "site"
    site.mkdir()
    (site / "qatkit").symlink_to(REPO / "qatkit")
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-m", "qatkit", "--help"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=60)
    assert out.returncode == 0 and "demo" in out.stdout and "bench" not in out.stdout
