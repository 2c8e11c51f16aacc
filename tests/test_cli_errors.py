"""The command line, through real subprocesses: every user error is one line with exit 2,
Ctrl-C exits 130 without a traceback, a closed pipe is silent, and an output path that is a
directory is refused before the long run (and never overwrites DIR.json)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from qatkit.cli.main import main

QATKIT = [sys.executable, "-m", "qatkit"]


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*QATKIT, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (("demo", "--epochs", "-1"), "argument --epochs: must be >= 1, got -1"),
    (("demo", "--epochs", "0"), "argument --epochs: must be >= 1, got 0"),
    (("demo", "--qat-epochs", "-2"), "argument --qat-epochs: must be >= 0, got -2"),
    (("demo", "--nproc", "0"), "argument --nproc: must be >= 1, got 0"),
    (("demo", "--nproc", "two"), "argument --nproc: expected an integer, got 'two'"),
    (("report", "--demo", "--samples", "0"), "argument --samples: must be >= 1, got 0"),
    (("report", "--demo", "--budget", "-1"), "argument --budget: must be >= 0, got -1"),
    (("report", "--demo", "--damage-factor", "nan"), "argument --damage-factor: must be a"),
    (("report", "--demo", "--threads", "0"), "--threads must be >= 1, got 0"),
])
def test_usage_errors_exit_2_with_one_line(args: tuple, message: str, capsys) -> None:
    """In process (argparse answers before any work; the subprocess cases below cover the
    process boundary)."""
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_range_error_in_a_real_process() -> None:
    out = _run("demo", "--epochs", "-1")
    assert out.returncode == 2
    assert out.stderr == "qatkit demo: error: argument --epochs: must be >= 1, got -1\n"


def test_demo_save_into_a_file_is_refused_before_training(tmp_path) -> None:
    f = tmp_path / "not_a_dir"
    f.write_text("keep")
    t = time.perf_counter()
    out = _run("demo", "--save", str(f))
    assert out.returncode == 2 and f"--save: {f} exists and is not a directory" in out.stderr
    assert time.perf_counter() - t < 60 and f.read_text() == "keep"


def test_report_output_directory_is_a_usage_error_and_dir_json_survives(tmp_path) -> None:
    d = tmp_path / "out"
    d.mkdir()
    unrelated = tmp_path / "out.json"
    unrelated.write_text('{"mine": 1}')
    out = _run("report", "--demo", "--output", str(d))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"qatkit report: error: --output: {d} is a directory; give a " \
                                 "file name"
    assert unrelated.read_text() == '{"mine": 1}'


def test_doctor_output_directory_is_a_usage_error(tmp_path) -> None:
    target = tmp_path / "m.py"
    target.write_text("def f():\n    raise SystemExit('never called')\n")
    out = _run("doctor", f"{target}:f", "--march", "nash-e", "--output", str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert f"--output: {tmp_path} is a directory" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_ctrl_c_exits_130_without_a_traceback() -> None:
    p = subprocess.Popen([*QATKIT, "demo", "--epochs", "50"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        first = p.stderr.read(1)  # the first progress output: training has started
        assert first, "the demo printed nothing"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err


def test_broken_pipe_is_silent() -> None:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written, like `| head -0`
    p = subprocess.run([*QATKIT, "marches", "--json"], stdout=w, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    os.close(w)
    assert p.returncode == 0 and p.stderr == ""
