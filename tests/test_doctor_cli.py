"""``qatkit doctor FILE.py:FUNC``: exit codes 0/1/2, formats, one-line usage errors.

Three runs go through a real subprocess (``python -m qatkit doctor``: no traceback, exit
status as the shell sees it); the rest call ``qatkit.cli.doctor.main`` in-process (same code path,
without paying for a Python start-up each time).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qatkit.cli import doctor as doctor_cli

torch.set_num_threads(1)

MODELS = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import qatkit as qk


    class Net(nn.Module):
        def __init__(self, plus=False):
            super().__init__()
            self.plus = plus
            self.quant, self.dequant = qk.QuantStub(), qk.DeQuantStub()
            self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), \\
                nn.BatchNorm2d(8), nn.ReLU()
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.add, self.relu2 = qk.FloatFunctional(), nn.ReLU()
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

        def forward(self, x):
            x = self.relu1(self.bn1(self.conv1(self.quant(x))))
            y = self.bn2(self.conv2(x))
            y = self.add.add(y, x).exp() if self.plus else self.add.add(y, x)  # exp: no op
            return self.dequant(self.fc(self.pool(self.relu2(y)).flatten(1)))


    def good():
        torch.manual_seed(0)
        return Net().eval(), torch.randn(1, 3, 16, 16)


    def bad():
        torch.manual_seed(0)
        return Net(plus=True).eval(), torch.randn(1, 3, 16, 16)


    def model_only():
        return Net().eval()


    def unused():
        m = Net().eval()
        m.spare = nn.Linear(4, 4)
        return m, torch.randn(1, 3, 16, 16)


    def prepared():
        qk.set_march("bayes")
        m, x = good()
        return qk.prepare(m, x, qconfig=qk.default_qat_qconfig()), x


    def refused():
        m, x = good()
        with qk.set_march("nash-e"):
            m.bn1 = nn.ELU()
            return qk.prepare(m, x, qconfig=qk.default_qat_qconfig()), x


    def crashes():
        raise ValueError("dataset not found")


    NOT_A_FUNCTION = 3
''')


@pytest.fixture
def models(tmp_path: Path) -> Path:
    p = tmp_path / "models.py"
    p.write_text(MODELS)
    return p


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qatkit", "doctor", *args],
                          capture_output=True, text=True, timeout=120)


def test_subprocess_exit_0_text(models):
    r = _run(f"{models}:good", "--march", "nash-e")
    assert r.returncode == 0, r.stderr
    assert "stage float, march nash-e" in r.stdout and "0 error(s)" in r.stdout


def test_subprocess_exit_1_json(models):
    r = _run(f"{models}:bad", "--processor", "J6E", "--format", "json")
    assert r.returncode == 1, r.stderr
    d = json.loads(r.stdout)
    assert d["march"] == "nash-e" and d["summary"]["errors"] >= 1
    f = next(f for f in d["findings"] if f["code"] == "QK102")
    assert f["severity"] == "error" and "exp()" in f["message"] and "models.py:" in f["message"]


def test_subprocess_exit_2_missing_file(tmp_path):
    r = _run(f"{tmp_path / 'nope.py'}:make", "--march", "nash-e")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no such file" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("args, message", [
    (["{m}:missing"], "has no function 'missing'"),
    (["{m}:NOT_A_FUNCTION"], "has no function 'NOT_A_FUNCTION'"),
    (["{m}"], "expected FILE.py:FUNC"),
    (["{m}:crashes"], "raised ValueError: dataset not found"),
    (["{m}:model_only"], "no example inputs"),
    (["{m}:good", "--input-shape", "1,3,x"], "bad --input-shape"),
    (["{m}:good", "--input-shape", "1,0,16"], "bad --input-shape"),
    (["{m}:model_only", "--input-shape", "1,5,16,16"], "does not run on inputs of shape"),
    (["{m}:good", "--march", "nash-x"], "unknown march or processor"),
    (["{m}:good", "--march", "nash-e", "--processor", "J6E"], "not allowed with argument"),
    (["{m}:good", "--format", "xml"], "invalid choice"),
])
def test_usage_errors_exit_2_with_one_line(models, capsys, args, message):
    try:
        code = doctor_cli.main([a.format(m=models) for a in args])
    except SystemExit as e:  # argparse's own errors (bad choice, exclusive options)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_input_shape_for_a_model_only_function(models, capsys):
    assert doctor_cli.main([f"{models}:model_only", "--input-shape", "1,3,16,16",
                        "--march", "nash-e"]) == 0


def test_strict_turns_warnings_into_exit_1(models, capsys):
    argv = [f"{models}:unused", "--march", "nash-e"]
    assert doctor_cli.main(argv) == 0
    assert "QK101" in capsys.readouterr().out
    assert doctor_cli.main([*argv, "--strict"]) == 1


def test_output_file_json_and_html(models, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert doctor_cli.main([f"{models}:bad", "--march", "nash-e", "--format", "json",
                        "--output", str(out)]) == 1
    d = json.loads(out.read_text())
    assert {"findings", "march", "stage", "summary"} <= set(d)
    assert capsys.readouterr().out == ""
    page = tmp_path / "report.html"
    assert doctor_cli.main([f"{models}:bad", "--march", "nash-e", "--format", "html",
                        "--output", str(page)]) == 1
    assert page.read_text().startswith("<!DOCTYPE html>")


def test_prepared_model_uses_its_recorded_march(models, capsys):
    assert doctor_cli.main([f"{models}:prepared", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["march"] == "bayes" and d["stage"] == "prepared"


def test_workflow_error_inside_func_is_a_finding(models, capsys):
    assert doctor_cli.main([f"{models}:refused", "--format", "json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["findings"][0]["code"] == "QK106"


def test_qatkit_cli_dispatches_to_doctor(models, capsys):
    cli = pytest.importorskip("qatkit.cli.main")
    assert cli.main(["doctor", f"{models}:good", "--march", "nash-e", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["errors"] == 0


# ---- everything the workflow sees: history, findings inside FUNC, the march FUNC sets --------

EXTRA = textwrap.dedent('''
    import torch
    import qatkit as qk
    from models import Net, good

    OVERFIT = [{"epoch": e, "train_acc": 0.6 + 0.1 * e, "val_acc": 0.6} for e in range(4)]


    def checks_history_itself():
        qk.check_overfitting(OVERFIT)   # the common logging format: a list of per-epoch dicts
        return good()


    def own_march():
        qk.set_march("bayes")
        m, x = good()
        return qk.prepare(m, x, qconfig=qk.default_qat_qconfig()), x


    def with_calibration():
        m, x = good()
        m.quant = qk.QuantStub(scale=1 / 128)
        g = torch.Generator().manual_seed(0)
        rgb = [torch.rand(8, 3, 16, 16, generator=g) for _ in range(3)]   # RGB in [0, 1]
        return {"model": m, "example_inputs": x, "calibration": rgb}
''')


@pytest.fixture
def extra(models: Path) -> Path:
    p = models.parent / "extra.py"
    p.write_text(EXTRA)
    sys.path.insert(0, str(models.parent))
    yield p
    sys.path.remove(str(models.parent))
    sys.modules.pop("models", None)


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_history_file_reaches_qk009_and_strict_applies(models, tmp_path, capsys, fmt):
    rows = [{"epoch": e, "train_acc": 0.6 + 0.1 * e, "val_acc": 0.6} for e in range(4)]
    path = tmp_path / f"history.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("epoch,train_acc,val_acc\n" + "".join(
            f"{r['epoch']},{r['train_acc']},{r['val_acc']}\n" for r in rows))
    argv = [f"{models}:good", "--march", "nash-e", "--history", str(path), "--format", "json"]
    assert doctor_cli.main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert [f["code"] for f in d["findings"]] == ["QK009"]
    assert "30.0 points" in d["findings"][0]["message"]
    assert doctor_cli.main([*argv, "--strict"]) == 1


def test_warning_raised_inside_func_is_in_the_json_report(extra, capsys):
    argv = [f"{extra}:checks_history_itself", "--march", "nash-e", "--format", "json"]
    assert doctor_cli.main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert [f["code"] for f in d["findings"]] == ["QK009"]
    assert d["findings"][0]["message"].startswith("checks_history_itself() warned:")
    assert doctor_cli.main([*argv, "--strict"]) == 1


def test_march_set_inside_func_against_the_processor_is_qk002(extra, capsys):
    assert doctor_cli.main([f"{extra}:own_march", "--processor", "J6M",
                            "--format", "json"]) == 1
    d = json.loads(capsys.readouterr().out)
    f = d["findings"][0]
    assert f["code"] == "QK002" and "J6M" in f["message"] and "bayes" in f["message"]


def test_calibration_batches_from_func_reach_qk005(extra, capsys):
    assert doctor_cli.main([f"{extra}:with_calibration", "--processor", "J6E",
                            "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    f = next(f for f in d["findings"] if f["code"] == "QK005")
    assert "inferred, likely" in f["message"] and "never negative" in f["message"]


def test_bad_history_file_is_a_usage_error(models, tmp_path, capsys):
    bad = tmp_path / "h.json"
    bad.write_text("{not json")
    assert doctor_cli.main([f"{models}:good", "--march", "nash-e", "--history", str(bad)]) == 2
    assert "not valid JSON/CSV" in capsys.readouterr().err
