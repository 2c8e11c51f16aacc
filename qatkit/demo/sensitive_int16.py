"""The sensitivity-driven int16 qconfig on a demo: how much of the calibrated fixed point's gap
to float it closes, per number of int16 layers.

    python -m qatkit.demo.sensitive_int16 --dataset fashion [--float-checkpoint float.pt]

Float training and calibration as ``qatkit demo`` (same recipe and seed; ``--float-checkpoint``
reuses the float model a ``qatkit demo --save DIR`` wrote); layers are ranked by
:func:`qatkit.analysis.sensitivity.sensitivity` on the last 2000 training images (never the test
set), then for each ``k`` the top-``k`` layers get int16 outputs and weights
(:func:`qatkit.analysis.sensitivity_qconfig.sensitivity_qconfig`) and the fixed-point model is
measured on the test set.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import torch

from qatkit.analysis.sensitivity import sensitivity
from qatkit.analysis.sensitivity_qconfig import sensitivity_qconfig, try_sensitivity_qconfig
from qatkit.base.errors import QatkitWarning
from qatkit.base.march import resolve, set_march
from qatkit.demo import recipe
from qatkit.quantization import checkpoint
from qatkit.quantization.calibrate import calibrate
from qatkit.quantization.prepare import prepare
from qatkit.quantization.qconfig import default_calibration_qconfig


def run(dataset: str = "fashion", march: str = "nash-e", ks: tuple[int, ...] = (1, 2, 3),
        seed: int = 0, float_checkpoint: str | None = None, quiet: bool = True
        ) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    split = recipe.load(dataset, seed)
    epochs, _ = recipe.default_epochs(dataset, None, None)
    example = recipe.centered(split.x_train[:2])
    with set_march(march), warnings.catch_warnings():
        warnings.simplefilter("ignore", QatkitWarning)
        float_model = recipe.demo_net(split)
        if float_checkpoint:
            checkpoint.load(float_model, float_checkpoint)
        else:
            recipe.train_float(float_model, split, epochs, seed, quiet)
        float_model.eval()
        calib = prepare(float_model, example, qconfig=default_calibration_qconfig())
        calibrate(calib, recipe.calibration_batches(split), progress=not quiet)
        held = recipe.centered(split.x_train[-2000:]), split.y_train[-2000:]
        sens = sensitivity(calib, *held)
        x_test, y_test = recipe.centered(split.x_test), split.y_test
        rows = []
        for k in ks:
            plan = sensitivity_qconfig(sens, calib, top_k=k)
            r = try_sensitivity_qconfig(float_model, calib, plan, example,
                                        recipe.calibration_batches(split), x_test, y_test)
            rows.append({"k": k, **{key: r[key] for key in (
                "layers", "budget", "float", "before", "after", "gain", "gap_closed")},
                "changes": r["changes"]})
    return {"dataset": split.name, "march": resolve(march).name, "ranking": sens.ranking(),
            "rows": rows, "seed": seed, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qatkit.demo.sensitive_int16")
    p.add_argument("--dataset", choices=("digits", "fashion"), default="fashion")
    p.add_argument("--march", default="nash-e")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float-checkpoint", default=None)
    a = p.parse_args(argv)
    print(json.dumps(run(a.dataset, a.march, tuple(a.k), a.seed, a.float_checkpoint)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
