"""Consistency levels on a demo: the QAT model against its fixed-point model at each level.

    python -m qatkit.demo.consistency --dataset fashion --levels 0 1 2

One float model (the ``qatkit demo`` recipe and seed), then for each level the demo's
calibration, QAT and convert under ``qk.set_consistency_level(level)`` (nash-e). Reported per
level: test accuracy of the QAT (fake quant) and fixed-point models, their top-1 agreement, and
the mean absolute difference of their logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Any

import torch

from qatkit.base.errors import QatkitWarning
from qatkit.base.march import resolve, set_march
from qatkit.demo import recipe
from qatkit.quantization.calibrate import calibrate
from qatkit.quantization.consistency import set_consistency_level
from qatkit.quantization.convert import convert
from qatkit.quantization.fake_quant import FakeQuantState, set_fake_quantize
from qatkit.quantization.prepare import prepare
from qatkit.quantization.qconfig import default_calibration_qconfig, default_qat_qconfig


@torch.no_grad()
def _logit_gap(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    total = 0.0
    for i in range(0, len(x), 500):
        xb = recipe.centered(x[i:i + 500])
        total += float((a(xb) - b(xb)).abs().mean()) * len(xb)
    return total / len(x)


def run(dataset: str = "fashion", march: str = "nash-e", levels: tuple[int, ...] = (0, 1, 2),
        seed: int = 0) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    split = recipe.load(dataset, seed)
    epochs, qat_epochs = recipe.default_epochs(dataset, None, None)
    example = recipe.centered(split.x_train[:2])
    rows = []
    with set_march(march), warnings.catch_warnings():
        warnings.simplefilter("ignore", QatkitWarning)
        float_model = recipe.demo_net(split)
        recipe.train_float(float_model, split, epochs, seed, True)
        float_acc = recipe.accuracy(float_model, split.x_test, split.y_test)
        for level in levels:
            with set_consistency_level(level):
                calib = prepare(float_model, example, qconfig=default_calibration_qconfig())
                calibrate(calib, recipe.calibration_batches(split), progress=False)
                calib_acc = recipe.accuracy(convert(calib), split.x_test, split.y_test)
                qat = prepare(float_model, example, qconfig=default_qat_qconfig())
                qat.load_state_dict(calib.state_dict())
                qat.train()
                set_fake_quantize(qat, FakeQuantState.QAT)
                recipe.train(qat, split, qat_epochs, lr=1e-3, seed=seed + 1000, quiet=True,
                             sgd=True)
                qat.eval()
                set_fake_quantize(qat, FakeQuantState.VALIDATION)
                fixed = convert(qat)
                rows.append({
                    "level": level,
                    "calibrated_fixed_point": calib_acc,
                    "qat": recipe.accuracy(qat, split.x_test, split.y_test),
                    "fixed_point": recipe.accuracy(fixed, split.x_test, split.y_test),
                    "top1_agreement": recipe.agreement(qat, fixed, split.x_test),
                    "mean_abs_logit_diff": _logit_gap(qat, fixed, split.x_test)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    return {"dataset": split.name, "march": resolve(march).name, "float": float_acc,
            "epochs": epochs, "qat_epochs": qat_epochs, "rows": rows, "seed": seed,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qatkit.demo.consistency")
    p.add_argument("--dataset", choices=("digits", "fashion"), default="fashion")
    p.add_argument("--march", default="nash-e")
    p.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(run(a.dataset, a.march, tuple(a.levels), a.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
