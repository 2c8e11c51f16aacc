"""Smoke test of the benchmark suite (``python -m bench --quick --json``) and its helpers.

No timing assertions: only that every figure exists and is a positive finite number.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.timing import measure, measure_interleaved, peak_memory

REPO = Path(__file__).resolve().parents[1]
MODELS = ("resnet18_like", "small_cnn")
SPEED_KEYS = (
    "float_forward",
    "float_train_step",
    "torchao_qat_train_step",
    "torchao_int8_forward",
    "float_eval_no_grad",
    "qatkit_fixedpoint_forward",
    "qatkit_qat_train_step",
    "qatkit_calibration_forward",
    "qatkit_calibration_minmax_forward",
    "qatkit_doctor_check",
    "pt2e_int8_forward",
    "pt2e_qat_train_step",
)
RATIO_KEYS = (
    "torchao_qat_step_over_float",
    "torchao_int8_forward_over_float",
    "fixedpoint_over_float",
    "fixedpoint_over_torchao_int8",
    "qat_step_over_float",
    "calibration_over_float_eval",
    "calibration_minmax_over_float_eval",
    "doctor_over_forward",
    "fixedpoint_over_pt2e_int8",
    "qat_step_over_pt2e_qat_step",
)
#: the issue's headline figures (JSON keys exactly so), each with a target
HEADLINE_KEYS = (
    "fixedpoint_over_float",
    "fixedpoint_over_torchao_int8",
    "fixedpoint_over_pt2e_int8",
    "qat_step_over_float",
    "calibration_over_float_eval",
    "doctor_over_forward",
)
#: reported beside the targets, without one
PEER_HEADLINE_KEYS = ("qat_step_over_pt2e_qat_step", "torchao_qat_step_over_float")
ACCURACY_KEYS = ("float", "calibrated", "qat", "torchao_int8", "pt2e_int8")


def _positive_finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_report() -> dict:
    # one thread: the machine may be shared, and two threads on two busy cores crawl
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", "--threads", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_meta(quick_report):
    meta = quick_report["meta"]
    assert meta["quick"] is True and meta["threads"] == 1
    assert meta["torch"] and meta["quantized_engine"] == "x86"
    assert meta["compile"] is False and meta["pt2e_available"] is True
    # quick mode compiles nothing: the compiled-epilogue entry is left out
    assert meta["qatkit_kernels"] == {"qatkit_fixedpoint_forward": "reference",
                                      "qatkit_fixedpoint_forward_compiled": None}
    assert _positive_finite(meta["total_s"])


def test_model_sizes(quick_report):
    for name in MODELS:
        info = quick_report["models"][name]
        assert _positive_finite(info["params"]) and _positive_finite(info["macs_per_image"])
        assert info["macs_per_image"] == info["macs_conv"] + info["macs_linear"]
    assert quick_report["models"]["resnet18_like"]["params"] == 11_689_512  # torchvision's count


def test_speed_figures_and_ratios(quick_report):
    speed = quick_report["speed"]
    for name in MODELS:
        assert set(speed[name]) == {"batch_2"}
        for case in speed[name].values():
            for key in SPEED_KEYS:
                assert _positive_finite(case[key]["median_s"]), (name, key)
                assert case[key]["min_s"] <= case[key]["median_s"] <= case[key]["max_s"]
            for key in RATIO_KEYS:
                assert _positive_finite(case["ratios"][key]), (name, key)
                assert _positive_finite(case["ratios_from_min"][key]), (name, key)


def test_accuracy_section(quick_report):
    acc = quick_report["accuracy"]
    assert acc["dataset"] == "digits" and acc["test_images"] > 0
    for key in ACCURACY_KEYS:
        res = acc["results"][key]
        assert 0.5 < res["accuracy"] <= 1.0, key
        assert 0.0 <= res["agreement_with_float"] <= 1.0
        assert acc[key] == res["accuracy"], key
    assert acc["results"]["float"]["agreement_with_float"] == 1.0


def test_headline_figures(quick_report):
    # quick mode: the large model at its largest batch (2); details for every model and batch
    for key in HEADLINE_KEYS:
        fig = quick_report[key]
        assert fig["model"] == "resnet18_like" and fig["batch"] == "batch_2", key
        assert _positive_finite(fig["value"]), key
        assert fig["met"] in (True, False) and fig["target"].startswith(("<=", ">=")), key
        assert set(fig["details"]) == set(MODELS), key
        for per_batch in fig["details"].values():
            assert set(per_batch) == {"batch_2"}, key
            assert all(_positive_finite(v) for v in per_batch.values()), key
    for key in PEER_HEADLINE_KEYS:
        fig = quick_report[key]
        assert _positive_finite(fig["value"]) and fig["target"] is None and fig["met"] is None
    for key in ("fixedpoint_compiled_over_float", "fixedpoint_compiled_over_reference",
                "compiled_qat_step_over_eager", "compiled_qat_step_over_float"):
        fig = quick_report[key]  # the compiled entries are left out in quick mode
        assert fig["value"] is None and fig["target"] is None and fig["met"] is None, key
    mem = quick_report["memory_fixedpoint_over_float"]
    assert mem["value"] is None and mem["met"] is None and mem["details"] == {}


def test_cost_per_mac(quick_report):
    cpm = quick_report["cost_per_mac"]
    for name in MODELS:
        for case in cpm[name].values():
            assert all(_positive_finite(case[key]) for key in SPEED_KEYS)
    growth = cpm["large_over_small_per_mac"]
    assert set(growth) == {"batch_2"}
    assert all(_positive_finite(v) for v in growth["batch_2"].values())


def test_qatkit_bench_command_without_bench_package(tmp_path, monkeypatch, capsys):
    import argparse

    from qatkit.cli import bench as bench_cli
    from qatkit.cli import main as cli

    assert "bench" in cli.COMMANDS
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_cli, "_candidates", lambda: [str(tmp_path)])
    monkeypatch.setitem(sys.modules, "bench.__main__", None)  # not importable
    args = argparse.Namespace(json=True, quick=True, threads=1, sections=None)
    assert bench_cli.run(args) == 2
    assert "not installed" in capsys.readouterr().err


def test_qatkit_bench_command_usage_error():
    proc = subprocess.run(
        [sys.executable, "-m", "qatkit.cli.main", "bench", "--sections", "nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and "unknown section" in proc.stderr


def test_memory_section_skipped_in_quick_mode(quick_report):
    assert "skipped" in quick_report["memory"]


def test_measure_counts_calls():
    calls = []
    t = measure(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(t["all"]) == 3
    assert t["min_s"] <= t["median_s"] and all(v >= 0 for v in t["all"])
    with pytest.raises(ValueError):
        measure(lambda: None, repeats=0)


def test_measure_interleaved_alternates():
    order: list[str] = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    t = measure_interleaved(fns, warmup=1, rounds=3)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert {k: len(v["all"]) for k, v in t.items()} == {"a": 3, "b": 3}
    t = measure_interleaved(fns, warmup=1, rounds=2, min_time_s=10.0, max_repeats=8)
    assert {k: len(v["all"]) for k, v in t.items()} == {"a": 8, "b": 8}
    t = measure_interleaved(fns, warmup=0, rounds=5, budget_s=0.0)  # budget spent: 2 rounds
    assert {k: len(v["all"]) for k, v in t.items()} == {"a": 2, "b": 2}


def touch_bytes(nbytes: int) -> Callable[[], int]:
    """peak_memory factory (module level, imported by name in the child process)."""

    def run() -> int:
        buf = b"\x01" * nbytes  # written, so every page is resident
        return len(buf)

    return run


def test_peak_memory_sees_a_fresh_allocation():
    n = 64 * 1024 * 1024
    r = peak_memory(touch_bytes, n)
    assert r["method"].startswith(("clear_refs", "ru_maxrss"))
    if r["method"].startswith("clear_refs"):  # glibc's threshold held fixed in the child
        assert r["method"].endswith("mmap threshold 131072") or "MALLOC_MMAP_THRESHOLD_" in \
            os.environ
    assert 0.9 * n <= r["peak_delta_bytes"] <= 2 * n
    with pytest.raises(ValueError):
        peak_memory(lambda: lambda: None)


def test_small_cnn_macs_by_hand():
    from bench.models import count_macs, small_cnn

    # conv1 1->16 @28x28, conv2 16->32 s2 @14x14, conv3/conv4 32->32 @14x14, conv5 32->64 @7x7
    conv = (
        28 * 28 * 16 * 9 + 14 * 14 * 32 * 16 * 9 + 2 * 14 * 14 * 32 * 32 * 9 + 7 * 7 * 64 * 32 * 9
    )
    assert count_macs(small_cnn(), (1, 28, 28)) == {
        "conv": conv,
        "linear": 640,
        "total": conv + 640,
    }
