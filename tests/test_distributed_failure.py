"""A rank that fails inside synchronized calibration makes every rank fail quickly, with a
qatkit error naming it (real gloo processes through qatkit.distributed.launch.spawn)."""

from __future__ import annotations

import time

import torch
import torch.nn as nn

import qatkit as qk
from qatkit.distributed.launch import spawn

TIMEOUT_S = 1.0


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.fc, self.dequant = qk.QuantStub(), nn.Linear(4, 3), qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.quant(x)))


def _batches(rank: int, fail_after: int | None, sleep_s: float = 0.0):
    g = torch.Generator().manual_seed(rank)
    for i in range(3):
        if fail_after is not None and rank == 1 and i == fail_after:
            time.sleep(sleep_s)
            raise ValueError("bad sample in shard 1")
        yield torch.randn(8, 4, generator=g)


def _scenario(rank: int, fail_after: int, sleep_s: float) -> dict:
    torch.manual_seed(0)
    with qk.set_march("nash-e"):
        model = qk.prepare(Tiny().eval(), torch.randn(2, 4),
                           qconfig=qk.default_calibration_qconfig())
    t = time.perf_counter()
    try:
        qk.distributed.calibrate(model, _batches(rank, fail_after, sleep_s), timeout_s=TIMEOUT_S)
        return {"error": None, "seconds": time.perf_counter() - t}
    except Exception as e:  # what each rank raised, compared by the test
        return {"error": type(e).__name__, "code": getattr(e, "code", None), "message": str(e),
                "seconds": time.perf_counter() - t}


def _worker(rank: int, world: int) -> dict:
    return {"raised": _scenario(rank, 1, 0.0),  # rank 1 raises in its calibration loop
            "late": _scenario(rank, 1, 2.5 * TIMEOUT_S)}  # ... after hanging past the timeout


def test_a_failing_rank_stops_every_rank_with_an_error_naming_it() -> None:
    r0, r1 = spawn(_worker, 2, threads=1, timeout_s=120)
    # rank 1 gets its own error back; rank 0 a qatkit error naming rank 1, at once
    assert r1["raised"]["error"] == "ValueError"
    e = r0["raised"]
    assert e["error"] == "QatkitError" and e["code"] == "QK004", e
    assert "rank 1 failed (ValueError: bad sample in shard 1)" in e["message"]
    assert "gloo" not in e["message"].lower()
    assert e["seconds"] < TIMEOUT_S + 5, e
    # a rank that does not arrive: the others stop after the configured timeout, naming it
    late = r0["late"]
    assert late["code"] == "QK004", late
    assert f"rank 1 did not reach the synchronization point within {TIMEOUT_S:g} s" in \
        late["message"]
    assert TIMEOUT_S - 0.5 < late["seconds"] < 3 * TIMEOUT_S, late
    assert r1["late"]["error"] == "ValueError"
