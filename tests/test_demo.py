"""The main job: `qatkit demo` end to end on real data (sklearn digits)."""

import json
import subprocess
import sys

import pytest


def test_demo_json_meets_the_accuracy_target(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qatkit.cli.main", "demo", "--json", "--save", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "2",
                                                         **__import__("os").environ})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    for key in ("dataset", "march", "float_accuracy", "calibration_accuracy", "qat_accuracy",
                "quantized_accuracy", "seconds"):
        assert key in r
    assert r["dataset"] == "digits" and r["march"] == "nash-e"
    assert r["float_accuracy"] > 0.95
    # the done-criterion: final fixed-point accuracy within 1 point of float
    assert r["quantized_accuracy"] >= r["float_accuracy"] - 0.01
    assert {p.name for p in tmp_path.iterdir()} == {
        "float.pt", "calibrated.pt", "qat.pt", "quantized.pt"}


def test_demo_fashion_missing_or_unknown_march_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "qatkit.cli.main", "demo", "--march", "nash-x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "[QK002] unknown march or processor 'nash-x'" in out.stderr
    assert "Traceback" not in out.stderr


def test_marches_lists_every_march():
    out = subprocess.run([sys.executable, "-m", "qatkit.cli.main", "marches", "--json"],
                         capture_output=True, text=True, timeout=60)
    rows = json.loads(out.stdout)
    assert {r["march"] for r in rows} >= {"bernoulli2", "bayes", "bayes-e", "nash-e", "nash-m",
                                          "nash-p", "nash-b"}
    assert any("J6E" in r["processors"] for r in rows if r["march"] == "nash-e")


@pytest.mark.slow
def test_demo_threads_reach_the_worker_processes():
    # 2 threads in each of 2 processes: the default would share the cores out (1 on 2 cores)
    out = subprocess.run(
        [sys.executable, "-m", "qatkit.cli.main", "demo", "--nproc", "2", "--threads", "2",
         "--epochs", "1", "--qat-epochs", "0", "--json"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["nproc"] == 2 and r["threads_per_rank"] == [2, 2] and r["threads"] == 2
    assert r["checkpoint_loaded_on_all_ranks"]
