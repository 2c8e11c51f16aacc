"""The demo's multi-process run (``qatkit demo --nproc N``): sharded calibration, DDP QAT,
sharded evaluation, each rank on its shard of the same real data."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from qatkit.base.march import resolve, set_march
from qatkit.distributed.calibration import (
    _device,
    _rank,
    calibrate,
    check_consistent,
    shard,
    world_size,
)
from qatkit.distributed.launch import ddp, load, save, spawn
from qatkit.quantization.convert import convert
from qatkit.quantization.fake_quant import FakeQuantState, set_fake_quantize
from qatkit.quantization.prepare import prepare
from qatkit.quantization.qconfig import default_calibration_qconfig, default_qat_qconfig


def sharded_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     batch_size: int = 500, group: Any = None) -> float:
    """Test accuracy with each rank evaluating its shard; correct counts are summed (exact)."""
    from qatkit.demo.recipe import centered
    idx = shard(len(y), _rank(group), world_size(group))
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(idx.start, idx.stop, batch_size):
            j = min(i + batch_size, idx.stop)
            correct += int((model(centered(x[i:j])).argmax(1) == y[i:j]).sum())
    t = torch.tensor([correct], dtype=torch.int64)
    if world_size(group) > 1:
        t = t.to(_device(group))
        dist.all_reduce(t, group=group)
    return int(t) / len(y)


def train_ddp(model: nn.Module, split: Any, epochs: int, lr: float, seed: int,
              batch_size: int = 64, step_hook: Callable[[], None] | None = None
              ) -> list[float]:
    """The demo's SGD training under DDP: every step, the global batch that one process would
    draw (same permutation) is split across the ranks, and each rank's summed loss is scaled
    by ``world / global_batch`` so DDP's gradient average equals the one-process gradient of
    the global batch (up to float summation order). Returns the mean loss of each epoch."""
    import torch.nn.functional as F

    from qatkit.demo import data
    from qatkit.demo.recipe import centered
    rank, world = _rank(), world_size()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    losses = []
    for ep in range(epochs):
        model.train()
        total = torch.zeros(2, dtype=torch.float64)
        for xb, yb in data.batches(split.x_train, split.y_train, batch_size, shuffle=True,
                                   seed=seed + ep):
            part = shard(len(yb), rank, world)
            x, y = xb[part.start:part.stop], yb[part.start:part.stop]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(centered(x)), y, reduction="sum")
            (loss * (world / len(yb))).backward()
            opt.step()
            if step_hook is not None:
                step_hook()
            total += torch.tensor([float(loss.detach()), len(y)], dtype=torch.float64)
        sched.step()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total[0] / total[1].clamp_min(1)))
    return losses


def _demo_worker(rank: int, world: int, dataset: str, march: str, qat_epochs: int, seed: int,
                 float_path: str, save_dir: str | None, work: str, run_id: str = ""
                 ) -> dict[str, Any]:
    from qatkit.demo import recipe as demo
    torch.manual_seed(seed)
    split = demo.load(dataset, seed)
    example = demo.centered(split.x_train[:2])
    with set_march(march):
        float_model = demo.demo_net(split)
        float_model.load_state_dict(torch.load(float_path, weights_only=True))

        calib = prepare(float_model, example, qconfig=default_calibration_qconfig())
        cal_x = split.x_train[:1024]  # the single-process demo's calibration set, sharded
        part = shard(len(cal_x), rank, world)
        batches = [demo.centered(cal_x[i:min(i + 128, part.stop)])
                   for i in range(part.start, part.stop, 128)]
        calibrate(calib, batches)
        calib_acc = sharded_accuracy(convert(calib), split.x_test, split.y_test)

        qat = prepare(float_model, example, qconfig=default_qat_qconfig())
        qat.load_state_dict(calib.state_dict())
        qat.train()
        set_fake_quantize(qat, FakeQuantState.QAT)
        model = ddp(qat)
        train_ddp(model, split, qat_epochs, lr=1e-3, seed=seed + 1000)
        qat.eval()
        set_fake_quantize(qat, FakeQuantState.VALIDATION)
        check_consistent(qat)
        qat_acc = sharded_accuracy(qat, split.x_test, split.y_test)
        quantized = convert(qat)
        quant_acc = sharded_accuracy(quantized, split.x_test, split.y_test)

        # Checkpoints come from rank 0; every rank loads the QAT one back to prove they load.
        out = save_dir or work
        if rank == 0 and save_dir:
            os.makedirs(save_dir, exist_ok=True)
        for name, m in (("float", float_model), ("calibrated", calib), ("qat", qat),
                        ("quantized", quantized)):  # atomic; the run id marks this run's files
            save(m, os.path.join(out, name + ".pt"), run=run_id or None)
        back = prepare(float_model, example, qconfig=default_qat_qconfig())
        load(back, os.path.join(out, "qat.pt"))
        mine, ref = back.state_dict(), qat.state_dict()
        same = all(torch.equal(mine[k], ref[k]) for k in ref if isinstance(ref[k], torch.Tensor))
    return {"calibration_accuracy": calib_acc, "qat_accuracy": qat_acc,
            "quantized_accuracy": quant_acc, "checkpoint_loaded": same,
            "threads": torch.get_num_threads()}


def run_demo(args: Any) -> dict[str, Any]:
    """``qatkit demo --nproc N``: float training in this process (as the one-process demo),
    then calibration (synchronized, disjoint shards of the same calibration set) and DDP QAT
    in N spawned gloo processes, each with ``args.threads`` torch threads (default: the
    cores shared out). Returns the one-process demo's fields plus ``nproc``,
    ``backend`` and ``checkpoint_loaded_on_all_ranks``."""
    import time

    from qatkit.demo import recipe as demo
    t0 = time.perf_counter()
    nproc, seed = int(args.nproc), int(args.seed)
    quiet = bool(getattr(args, "json", False))
    torch.manual_seed(seed)
    split = demo.load(args.dataset, seed)
    epochs, qat_epochs = demo.default_epochs(args.dataset, args.epochs, args.qat_epochs)
    march = resolve(args.march).name
    with set_march(march):
        float_model = demo.demo_net(split)
        demo.train_float(float_model, split, epochs, seed, quiet)
        float_acc = demo.accuracy(float_model, split.x_test, split.y_test)
    with tempfile.TemporaryDirectory(prefix="qatkit-demo-") as work:
        float_path = os.path.join(work, "float_weights.pt")
        torch.save(float_model.state_dict(), float_path)
        # --threads sets each worker's torch threads too (default: the cores shared out)
        results = spawn(_demo_worker, nproc, args.dataset, march, qat_epochs, seed,
                        float_path, args.save, work, uuid.uuid4().hex,
                        threads=getattr(args, "threads", None))
    r0 = results[0]
    return {
        "dataset": split.name, "march": march, "float_accuracy": float_acc,
        "calibration_accuracy": r0["calibration_accuracy"],
        "qat_accuracy": r0["qat_accuracy"], "quantized_accuracy": r0["quantized_accuracy"],
        "quantized_minus_float": r0["quantized_accuracy"] - float_acc, "epochs": epochs,
        "qat_epochs": qat_epochs, "train_size": len(split.y_train),
        "test_size": len(split.y_test), "seed": seed, "torch": torch.__version__,
        "threads": r0["threads"], "threads_per_rank": [r["threads"] for r in results],
        "seconds": round(time.perf_counter() - t0, 2),
        "nproc": nproc, "backend": "gloo",
        "checkpoint_loaded_on_all_ranks": all(r["checkpoint_loaded"] for r in results),
    }
