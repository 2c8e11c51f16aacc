"""The J6 march table: every march and processor, dtypes, high-precision outputs, and the
processor -> march check (QK002) following it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import qatkit as qk
from qatkit.base.march import MARCHES, resolve
from tests._rules import digits, trained_digits_net

J6 = {"nash-e": "J6E", "nash-m": "J6M", "nash-h": "J6H", "nash-p": "J6P", "nash-b": "J6B",
      "nash-b-lite": "J6B-Lite", "nash-b-plus": "J6B-Plus"}


@pytest.mark.parametrize("march, processor", sorted(J6.items()))
def test_every_j6_processor_resolves_to_its_march(march: str, processor: str) -> None:
    assert resolve(processor=processor).name == march
    assert resolve(processor=processor.lower()).name == march


def test_j6_dtypes_and_high_precision_outputs() -> None:
    for name in ("nash-b-lite", "nash-b", "nash-b-plus", "nash-h", "nash-p"):
        assert MARCHES[name].high_precision_outputs == ("float32", "float16"), name
    for name in ("nash-e", "nash-m"):
        assert MARCHES[name].high_precision_outputs == ("qint32",)
        assert MARCHES[name].consistency_levels == (0, 1, 2)
    assert {m.name for m in MARCHES.values() if "float16" in m.activation_dtypes} == {
        "nash-h", "nash-p"}
    assert {m.name for m in MARCHES.values() if "qint16" in m.weight_dtypes} == {
        "nash-e", "nash-m", "nash-h", "nash-p", "nash-b", "nash-b-plus"}
    assert {m.name for m in MARCHES.values() if len(m.consistency_levels) > 1} == {
        "nash-e", "nash-m"}


def test_j6h_user_on_nash_p_is_told_nash_h() -> None:
    with pytest.raises(qk.QatkitError, match=r"\[QK002\] march 'nash-p' is not the march of "
                                             r"processor 'J6H' \(which needs 'nash-h'\)"):
        qk.set_march("nash-p", processor="J6H")
    d = digits()
    with qk.set_march("nash-p"), pytest.raises(
            qk.QatkitError, match=r"\[QK002\] march 'nash-p' is not the march of the declared "
                                  r"processor 'J6H', which needs 'nash-h'"):
        qk.prepare(trained_digits_net(), d.x_train[:8], processor="J6H",
                   qconfig=qk.default_qat_qconfig())


def test_cli_marches_lists_every_march_with_processors() -> None:
    out = subprocess.run([sys.executable, "-m", "qatkit", "marches", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {r["march"]: r for r in json.loads(out.stdout)}
    for march, processor in J6.items():
        assert processor in rows[march]["processors"], march
    assert "J6H" not in rows["nash-p"]["processors"]
    assert rows["nash-h"]["high_precision_dtypes"] == ["float32", "float16"]
    assert rows["nash-e"]["weight_dtypes"] == ["qint8", "qint16"]


def test_cli_doctor_processor_j6h_selects_nash_h(tmp_path: Path) -> None:
    p = tmp_path / "models.py"
    p.write_text("import torch, torch.nn as nn\nimport qatkit as qk\n\n"
                 "class Net(nn.Module):\n"
                 "    def __init__(self):\n"
                 "        super().__init__()\n"
                 "        self.quant, self.conv = qk.QuantStub(), nn.Conv2d(3, 4, 3)\n"
                 "        self.dequant = qk.DeQuantStub()\n"
                 "    def forward(self, x):\n"
                 "        return self.dequant(self.conv(self.quant(x)))\n\n"
                 "def good():\n"
                 "    return Net().eval(), torch.randn(1, 3, 8, 8)\n")
    r = subprocess.run([sys.executable, "-m", "qatkit", "doctor", f"{p}:good", "--processor",
                        "J6H", "--format", "json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["march"] == "nash-h"
