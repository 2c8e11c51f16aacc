"""Atomic writes: an interrupted write leaves the old complete file; a directory mixing two
runs' checkpoints is refused at load; report outputs that are directories are refused."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import qatkit as qk
from qatkit.base import files
from qatkit.quantization import checkpoint


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.fc, self.dequant = qk.QuantStub(), nn.Linear(4, 2), qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.quant(x)))


class Interrupted(Exception):
    pass


def test_interrupted_text_write_keeps_the_old_file(tmp_path) -> None:
    p = tmp_path / "r.json"
    files.write_text(p, "old complete\n")
    with pytest.raises(Interrupted), files.atomic_open(p) as f:
        f.write("new, half")
        raise Interrupted
    assert p.read_text() == "old complete\n"
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left behind


def test_ctrl_c_inside_a_checkpoint_save_keeps_the_old_checkpoint(tmp_path, monkeypatch) -> None:
    p = tmp_path / "float.pt"
    old = Tiny()
    checkpoint.save(old, p)
    real_save = torch.save

    def save_then_interrupt(obj, f, *a, **k):  # half the bytes reach the file, then Ctrl-C
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(Tiny(), p)
    monkeypatch.undo()
    back = checkpoint.load(Tiny(), p)
    assert torch.equal(back.fc.weight, old.fc.weight)
    assert os.listdir(tmp_path) == ["float.pt"]


def test_a_directory_mixing_two_runs_is_refused(tmp_path) -> None:
    models = {"float": Tiny(), "qat": Tiny()}
    for name, m in models.items():
        checkpoint.save(m, tmp_path / f"{name}.pt", run="run-a")
    assert set(checkpoint.load_run(tmp_path, {"float": Tiny(), "qat": Tiny()})) == {"float",
                                                                                     "qat"}
    checkpoint.save(Tiny(), tmp_path / "qat.pt", run="run-b")  # the newer run stopped early
    with pytest.raises(qk.QatkitError, match=r"different runs.*float\.pt: run-a.*qat\.pt: run-b"):
        checkpoint.load_run(tmp_path, {"float": Tiny(), "qat": Tiny()})


def test_checkpoint_path_problems_are_clear(tmp_path) -> None:
    with pytest.raises(qk.QatkitError, match="is a directory"):
        checkpoint.save(Tiny(), tmp_path)
    with pytest.raises(qk.QatkitError, match="is a directory"):
        checkpoint.load(Tiny(), tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(qk.QatkitError, match="cannot read checkpoint"):
        checkpoint.load(Tiny(), tmp_path / "bad.pt")


def test_output_problems(tmp_path) -> None:
    assert files.output_problem(tmp_path) == f"{tmp_path} is a directory; give a file name"
    (tmp_path / "f").write_text("x")
    assert "is not a directory" in files.output_problem(tmp_path / "f" / "out.html")
    assert files.output_problem(tmp_path / "new" / "deeper" / "out.html") is None
