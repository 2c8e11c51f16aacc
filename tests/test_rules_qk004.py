"""QK004: calibration on several devices (DataParallel, several torch.distributed processes).

The multi-process cases run a real 2-process gloo group on localhost."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import qatkit as qk
from qatkit.doctor.rules import qk004_multi_device_calibration as qk004
from tests._rules import (
    DigitsNet,
    calibrate,
    digits,
    qk_warnings,
    trained_digits_net,
)


def _prepared() -> nn.Module:
    d = digits()
    with qk.set_march("nash-e"):
        return qk.prepare(trained_digits_net(), d.x_train[:8],
                          qconfig=qk.default_calibration_qconfig())


def test_set_state_on_data_parallel_is_refused():
    calib = _prepared().eval()
    dp = nn.DataParallel(calib)
    with qk.set_march("nash-e"), pytest.raises(
            qk.QatkitError, match=r"^\[QK004\] calibration is running inside "
                                  r"torch.nn.DataParallel"):
        qk.set_fake_quantize(dp, qk.FakeQuantState.CALIBRATION)
    # other states are fine on a wrapper (QAT may use DataParallel)
    with qk.set_march("nash-e"):
        assert qk.set_fake_quantize(dp, qk.FakeQuantState.VALIDATION) is calib


def test_model_wrapped_after_the_state_was_set_is_refused_at_the_first_batch():
    d = digits()
    calib = _prepared().eval()
    with qk.set_march("nash-e"):
        qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
        dp = nn.DataParallel(calib)  # e.g. a shared evaluation helper that wraps models
        with torch.no_grad(), pytest.raises(qk.QatkitError, match=r"\[QK004\].*DataParallel.*"
                                                                  r"input QuantStub 'quant'"):
            dp(d.x_train[:64])


def test_replica_observer_update_is_refused():
    calib = _prepared().eval()
    with qk.set_march("nash-e"):
        qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
    fq = calib.conv1.activation_post_process
    replica = fq._replicate_for_data_parallel()  # what DataParallel runs on each GPU
    with pytest.raises(qk.QatkitError, match=r"\[QK004\].*replicas are thrown away"):
        replica(torch.randn(4, 16, 8, 8))


def test_single_device_calibration_is_clean_and_learns_scales():
    d = digits()
    calib = _prepared()
    with qk.set_march("nash-e"), qk_warnings() as codes:
        calibrate(calib, d.x_train)
        quantized = qk.convert(calib)
    assert "QK004" not in codes
    assert int(calib.conv1.activation_post_process.observer.count) > 0
    assert float((quantized(d.x_test).argmax(1) == d.y_test).float().mean()) > 0.5


# ---- two real processes ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    result: dict[str, object] = {}
    d = digits()
    qk.set_march("nash-e")
    model = DigitsNet()
    model.load_state_dict(torch.load(Path(out, "float.pt")))  # trained once, in the parent
    calib = qk.prepare(model.eval(), d.x_train[:8],
                       qconfig=qk.default_calibration_qconfig()).eval()
    # 1. the state set before the process group exists, the batches run inside it
    qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        try:
            with torch.no_grad():
                calib(d.x_train[rank::2][:64])
        except qk.QatkitError as e:
            result["forward"] = str(e)
        # 2. every rank calibrating its shard, the usual DDP habit
        try:
            qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
        except qk.QatkitError as e:
            result["set_state"] = str(e)
        # 3. the corrected flow: rank 0 calibrates the unwrapped model, the others wait
        if rank == 0:
            with qk_warnings() as codes:
                calibrate(calib, d.x_train)
                quantized = qk.convert(calib)
            result["rank0_codes"] = codes
            result["rank0_acc"] = float((quantized(d.x_test).argmax(1) == d.y_test)
                                        .float().mean())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_two_process_calibration_is_refused(tmp_path):
    torch.save(trained_digits_net().state_dict(), tmp_path / "float.pt")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    r0, r1 = results
    # every rank calibrating: refused on rank 1; rank 0 alone is the legitimate flow
    assert "forward" not in r0 and "set_state" not in r0
    assert r1["forward"].startswith("[QK004] calibration is running in 2 torch.distributed "
                                    "processes")
    assert r1["set_state"].startswith("[QK004] calibration is running in 2")
    assert "on rank 1" in r1["set_state"] and "rank 0 alone" in r1["set_state"]
    assert r0["rank0_codes"] == [] and r0["rank0_acc"] > 0.5


def test_the_rule_sees_a_synchronized_calibration_session():
    calib = _prepared().eval()
    assert not qk004.synchronized()
    with qk.set_march("nash-e"), qk.distributed.synchronized_calibration(calib):
        assert qk004.synchronized()
    assert not qk004.synchronized()


def test_ddp_wrapped_calibration_is_refused(tmp_path):
    """DDP (a real one-process gloo group) copies rank 0's buffers over the others' before
    every forward: refused when the state is set on it and when the batches run through it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        calib = _prepared().eval()
        ddp = nn.parallel.DistributedDataParallel(calib)
        with qk.set_march("nash-e"):
            with pytest.raises(qk.QatkitError, match=r"^\[QK004\].*DistributedDataParallel"):
                qk.set_fake_quantize(ddp, qk.FakeQuantState.CALIBRATION)
            qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
            with torch.no_grad(), pytest.raises(qk.QatkitError,
                                                match=r"\[QK004\].*DistributedDataParallel"):
                ddp(digits().x_train[:32])
    finally:
        dist.destroy_process_group()
