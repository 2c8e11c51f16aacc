"""Several processes: exact synchronized calibration and QAT under DDP.

Real torch.distributed (gloo) in spawned processes, no mocks. Each spawn costs a few seconds of
process start-up, so one spawn runs every calibration case and one runs the QAT case; the tests
assert on their results.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import qatkit as qk
from qatkit import distributed as qd
from qatkit.demo.data import load_digits
from qatkit.demo.distributed import sharded_accuracy, train_ddp
from qatkit.demo.recipe import DemoNet, accuracy, centered, train
from qatkit.quantization.calibrate import calibrate
from qatkit.quantization.fake_quant import fake_quants

N_CAL = 512
OBSERVERS = ("minmax", "percentile", "mse")
# case: (cut, gain): rank 0 calibrates on x[:cut], rank 1 on x[cut:] * gain, one process on both
CASES = {"halves": (N_CAL // 2, 1.0), "uneven": (173, 1.0), "rank1_empty": (N_CAL, 1.0),
         "ranges_differ": (N_CAL // 2, 5.0)}  # other histogram grids per rank: grow_to merges
WIDTH = 16


def _float_model(path: str) -> DemoNet:
    m = DemoNet(10, width=WIDTH)
    m.load_state_dict(torch.load(path, weights_only=True))
    return m


def _cal_data(case: str = "halves") -> torch.Tensor:
    x = centered(load_digits(seed=0).x_train[:N_CAL])
    cut, gain = CASES[case]
    x[cut:] *= gain
    return x


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer that calibration writes, plus the histograms (not in state_dict)."""
    out = {k: v.clone() for k, v in model.state_dict().items() if "post_process" in k}
    for name, fq in fake_quants(model):
        if hasattr(fq.observer, "hist"):
            out[name + ".observer.hist"] = fq.observer.hist.clone()
            out[name + ".observer.hist_exp"] = fq.observer.hist_exp.clone()
    return out


def _error(fn) -> str:
    try:
        fn()
    except qk.QatkitError as e:
        return str(e)
    return "no error"


def _scales_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for _, fq in fake_quants(model):
        h.update(fq.scale.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- workers (module level: spawned processes import them) ----------------------------------

def _calibration_worker(rank: int, world: int, weights: str) -> dict:
    x = _cal_data()
    out: dict = {}
    with qk.set_march("nash-e"):
        model = _float_model(weights)
        for obs in OBSERVERS:
            qconfig = qk.default_calibration_qconfig(observer=obs)
            for case, (cut, _) in CASES.items():
                x = _cal_data(case)
                calib = qk.prepare(model, x[:2], qconfig=qconfig)
                part = x[:cut] if rank == 0 else x[cut:]
                calibrate(calib, list(part.split(48)), synchronize=True)  # rank 1 may get []
                out[obs, case] = _state(calib)
        x = _cal_data()

        def fresh(qconfig=None):
            return qk.prepare(model, x[:2], qconfig=qconfig or qk.default_calibration_qconfig())

        mine = x[qd.shard(N_CAL)].split(64)
        out["moving_average"] = _error(lambda: calibrate(
            fresh(qk.default_qat_qconfig()), mine, synchronize=True))
        out["unsynchronized"] = _error(lambda: calibrate(fresh(), mine))
        ds = TensorDataset(x[:N_CAL - 1])  # odd length: DistributedSampler pads one sample
        loader = DataLoader(ds, batch_size=64, sampler=DistributedSampler(ds, shuffle=False))
        out["padded_sampler"] = _error(lambda: calibrate(fresh(), loader, synchronize=True))
        other = qk.default_calibration_qconfig(observer="mse" if rank == 0 else "percentile")
        out["mismatch"] = _error(lambda: calibrate(fresh(other), mine, synchronize=True))
        out["no_data"] = _error(lambda: calibrate(fresh(), [], synchronize=True))

        # calibration in two rounds (the second on a wider range: the grid grows after the
        # first merge), with the context manager; must equal one process on all of it
        xr = _cal_data("ranges_differ")
        calib = fresh(qk.default_calibration_qconfig(observer="percentile"))
        with qd.synchronized_calibration(calib), torch.no_grad():
            calib.eval()
            for lo, hi in ((0, N_CAL // 2), (N_CAL // 2, N_CAL)):
                qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
                part = qd.shard(hi - lo)
                for b in xr[lo + part.start:lo + part.stop].split(40):
                    calib(b)
                qk.set_fake_quantize(calib, qk.FakeQuantState.VALIDATION)
        out["two_rounds"] = _state(calib)
        # a block that ends in CALIBRATION leaves it itself, synchronized
        calib = fresh(qk.default_calibration_qconfig(observer="minmax"))
        with qd.synchronized_calibration(calib), torch.no_grad():
            calib.eval()
            qk.set_fake_quantize(calib, qk.FakeQuantState.CALIBRATION)
            for b in mine:
                calib(b)
        out["block_end"] = (_state(calib), {fq.state.name for _, fq in fake_quants(calib)})
    with qk.set_march("nash-m" if rank else "nash-e"):
        m = qk.prepare(model, x[:2], qconfig=qk.default_calibration_qconfig())
        out["march_mismatch"] = _error(lambda: calibrate(m, mine, synchronize=True))
    return out


def _qat_worker(rank: int, world: int, weights: str, ckpt_dir: str, epochs: int) -> dict:
    split = load_digits(seed=0)
    x = centered(split.x_train[:N_CAL])
    out: dict = {"digests": []}
    qat_q = qk.default_qat_qconfig()
    with qk.set_march("nash-e"):
        model = _float_model(weights)
        calib = qk.prepare(model, x[:2], qconfig=qk.default_calibration_qconfig())
        calibrate(calib, x[qd.shard(N_CAL)].split(64), synchronize=True)

        loose = qk.prepare(model, x[:2], qconfig=qat_q).train()
        out["uncalibrated_qat"] = _error(
            lambda: qk.set_fake_quantize(loose, qk.FakeQuantState.QAT))

        qat = qk.prepare(model, x[:2], qconfig=qat_q)
        qat.load_state_dict(calib.state_dict())
        qat.train()
        qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
        ddp = qd.ddp(qat)
        hook = lambda: out["digests"].append(_scales_digest(qat))  # noqa: E731
        train_ddp(ddp, split, epochs - 1, lr=1e-3, seed=1000, step_hook=hook)

        path = os.path.join(ckpt_dir, "qat.pt")
        qd.save(ddp, path)  # rank 0 writes, everyone waits
        resumed = qk.prepare(model, x[:2], qconfig=qat_q)
        qd.load(resumed, path)
        ref = qat.state_dict()
        out["loaded_equal"] = all(torch.equal(v, ref[k]) for k, v in resumed.state_dict().items()
                                  if isinstance(v, torch.Tensor))
        resumed.train()
        qk.set_fake_quantize(resumed, qk.FakeQuantState.QAT)
        ddp2 = qd.ddp(resumed)
        hook2 = lambda: out["digests"].append(_scales_digest(resumed))  # noqa: E731
        train_ddp(ddp2, split, 1, lr=5e-4, seed=1000 + epochs - 1, step_hook=hook2)

        resumed.eval()
        qk.set_fake_quantize(resumed, qk.FakeQuantState.VALIDATION)
        out["qat_accuracy"] = sharded_accuracy(resumed, split.x_test, split.y_test)
        out["quantized_accuracy"] = sharded_accuracy(qk.convert(resumed), split.x_test,
                                                        split.y_test)
        out["final_digest"] = _scales_digest(resumed)
    return out


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory, digits):
    torch.manual_seed(0)
    m = DemoNet(10, width=WIDTH)
    train(m, digits, epochs=3, lr=3e-3, seed=0, quiet=True)
    path = str(tmp_path_factory.mktemp("dist") / "float.pt")
    torch.save(m.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def two_ranks(weights):
    return qd.spawn(_calibration_worker, 2, weights, threads=1, timeout_s=120)


def _one_process(weights: str, observer: str, case: str = "halves") -> dict[str, torch.Tensor]:
    x = _cal_data(case)
    with qk.set_march("nash-e"):
        calib = qk.prepare(_float_model(weights), x[:2],
                           qconfig=qk.default_calibration_qconfig(observer=observer))
        calibrate(calib, list(x.split(100)))  # other batching than the ranks: must not matter
    return _state(calib)


# ---- calibration --------------------------------------------------------------------------------

@pytest.mark.parametrize("observer", OBSERVERS)
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_calibrate_exactly_like_one(two_ranks, weights, observer, case):
    ref = _one_process(weights, observer, case)
    r0, r1 = two_ranks[0][observer, case], two_ranks[1][observer, case]
    assert ref.keys() == r0.keys() == r1.keys()
    scales = [k for k in ref if k.endswith(".scale")]
    assert len(scales) >= 5
    for k in ref:  # scales, min/max, counts, histograms: all bit-identical
        assert torch.equal(r0[k], ref[k]), k
        assert torch.equal(r1[k], ref[k]), k
    assert all(bool(r0[k.replace(".scale", ".initialized")]) for k in scales)


def test_calibration_in_two_rounds_merges_each_sample_once(two_ranks, weights):
    ref = _one_process(weights, "percentile", "ranges_differ")
    for r in two_ranks:
        assert ref.keys() == r["two_rounds"].keys()
        assert all(torch.equal(r["two_rounds"][k], v) for k, v in ref.items())


def test_block_ending_in_calibration_leaves_it_synchronized(two_ranks, weights):
    ref = _one_process(weights, "minmax")
    for r in two_ranks:
        state, states = r["block_end"]
        assert states == {"VALIDATION"}
        assert all(torch.equal(state[k], v) for k, v in ref.items())


def test_moving_average_is_refused_with_what_to_use(two_ranks):
    for r in two_ranks:
        msg = r["moving_average"]
        assert msg.startswith("[QK004]") and "MovingAverageMinMaxObserver" in msg
        assert "order" in msg and "default_calibration_qconfig" in msg and "'mse'" in msg


def test_unsynchronized_calibration_in_two_processes_is_refused(two_ranks):
    """Every rank calibrating its own shard: refused on rank 1 (the job fails there); rank 0
    alone could be the legitimate rank-0-only calibration, so it is not refused."""
    assert two_ranks[0]["unsynchronized"] == "no error"
    r1 = two_ranks[1]["unsynchronized"]
    assert r1.startswith("[QK004]") and "on rank 1" in r1, r1


def test_padding_distributed_sampler_is_refused(two_ranks):
    for r in two_ranks:
        msg = r["padded_sampler"]
        assert msg.startswith("[QK004]") and "pads 511 samples to 512" in msg
        assert "qk.distributed.shard" in msg


def test_ranks_set_up_differently_is_an_error_on_every_rank(two_ranks):
    for r in two_ranks:
        assert r["mismatch"].startswith("[QK004]") and "PercentileObserver" in r["mismatch"]
        assert r["march_mismatch"].startswith("[QK004]") and "nash-m" in r["march_mismatch"]


def test_no_data_on_any_rank_fails_on_every_rank(two_ranks):
    for r in two_ranks:
        assert r["no_data"].startswith("[QK008]")


def test_shard_is_disjoint_complete_and_unpadded():
    for n in (0, 1, 7, 511, 512):
        for world in (1, 2, 3, 8):
            parts = [qd.shard(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(qk.QatkitError, match=r"\[QK000\]"):
        qd.shard(10, 2, 2)


def test_one_process_synchronize_is_plain_calibration(weights):
    x = _cal_data()
    with qk.set_march("nash-e"):
        calib = qk.prepare(_float_model(weights), x[:2], qconfig=qk.default_calibration_qconfig())
        calibrate(calib, list(x.split(100)), synchronize=True)
        assert not qd.synchronized_calibration_active()
    ref = _one_process(weights, "mse")
    assert all(torch.equal(v, ref[k]) for k, v in _state(calib).items())


# ---- QAT under DDP ------------------------------------------------------------------------------

def test_ddp_qat_two_processes(weights, digits, tmp_path):
    epochs = 2
    r0, r1 = qd.spawn(_qat_worker, 2, weights, str(tmp_path), epochs, threads=1, timeout_s=150)
    # every step used the same scales (weights and activations) on both ranks
    assert r0["digests"] and r0["digests"] == r1["digests"]
    assert r0["final_digest"] == r1["final_digest"]
    assert r0["loaded_equal"] and r1["loaded_equal"]  # rank 0's checkpoint, loaded everywhere
    assert r0["uncalibrated_qat"].startswith("[QK004]")
    assert "calibrate first" in r0["uncalibrated_qat"]
    assert r0["quantized_accuracy"] == r1["quantized_accuracy"]

    # the same workflow in one process
    x = _cal_data()
    with qk.set_march("nash-e"):
        model = _float_model(weights)
        calib = qk.prepare(model, x[:2], qconfig=qk.default_calibration_qconfig())
        calibrate(calib, x.split(64))
        qat = qk.prepare(model, x[:2], qconfig=qk.default_qat_qconfig())
        qat.load_state_dict(calib.state_dict())
        qat.train()
        qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
        train(qat, digits, epochs, lr=1e-3, seed=1000, quiet=True, sgd=True)
        qat.eval()
        qk.set_fake_quantize(qat, qk.FakeQuantState.VALIDATION)
        one = accuracy(qk.convert(qat), digits.x_test, digits.y_test)
    assert one >= 0.9 and r0["quantized_accuracy"] >= 0.9
    assert abs(r0["quantized_accuracy"] - one) <= 0.03, (r0["quantized_accuracy"], one)
