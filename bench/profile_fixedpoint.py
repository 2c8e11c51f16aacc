"""Where the fixed-point forward's time goes, beside torch.ao's int8 and the float forward.

``python -m bench.profile_fixedpoint [--batch 8] [--calls 3] [--threads 2]``: resnet18_like
(3x224x224), calibrated with min/max observers on a few random batches (the operators, not
the scales, set the cost), converted, then timed interleaved with float and torch.ao int8
(x86) in this one process, and one torch.profiler table of qatkit's forward (reference
epilogues, the default) by operator. Compare ratios within one run, never across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import qatkit as qk

from .models import resnet18_like
from .torchao_flow import torchao_int8_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=14)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = resnet18_like().eval()
    x = torch.randn(a.batch, 3, 224, 224)
    calib = [torch.randn(4, 3, 224, 224) for _ in range(2)]
    with qk.set_march("nash-e"):
        prepared = qk.prepare(model, x[:1], qconfig=qk.default_calibration_qconfig(
            observer="minmax"))
        fixed = qk.convert(qk.calibrate(prepared, calib))
    ao = torchao_int8_model(model, calib)
    runs = {"float": model, "torch.ao int8": ao, "qatkit fixed point": fixed}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for f in runs.values():  # warm-up (constants, prepacking)
            f(x)
        for _ in range(a.calls):
            for k, f in runs.items():
                t = time.perf_counter()
                f(x)
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{k:>20}: median {v:.4f} s over {a.calls} interleaved calls")
        print(f"fixed point / torch.ao int8: {med['qatkit fixed point'] / med['torch.ao int8']:.2f}"
              f"; fixed point / float: {med['qatkit fixed point'] / med['float']:.2f}")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fixed(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
