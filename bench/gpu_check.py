"""Bit-exact CPU vs CUDA fixed point, on the demo net and the resnet18-like net (run by
``bench/gpu_check.sh`` on a machine with a CUDA GPU).

For each net: calibrate on the CPU (default MSE observers), convert, run the fixed-point model
on the CPU; move the converted model to CUDA and run it there on the reference and on the
compiled kernels; every output must be bit-identical (``torch.equal``) to the CPU's. Also one
QAT step on CUDA (finite loss). Prints one JSON object; exits 1 on any mismatch.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

import qatkit as qk
from qatkit.demo.recipe import DemoNet
from qatkit.fixed_point import epilogue

from .models import MODELS

MARCH = "nash-e"


def _nets() -> list[tuple[str, torch.nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    demo = DemoNet()
    resnet = MODELS["resnet18_like"][0]()
    return [("demo", demo, (1, 28, 28)), ("resnet18_like", resnet, (3, 224, 224))]


def check(batch: int = 8, device: str = "cuda", nets: tuple[str, ...] = ("demo", "resnet18_like")
          ) -> dict:
    """``device="cpu"`` is a dry run of the same steps (a copy of the model on the CPU)."""
    cuda = device == "cuda"
    out: dict = {"device": torch.cuda.get_device_name() if cuda else device,
                 "torch": torch.__version__, "nets": {}}
    g = torch.Generator().manual_seed(1)
    ok = True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name, model, shape in _nets():
        if name not in nets:
            continue
        model.eval()
        calib = [torch.rand(batch, *shape, generator=g) for _ in range(2)]
        x = torch.rand(batch, *shape, generator=g)
        with qk.set_march(MARCH):
            prepared = qk.prepare(model, x[:1], qconfig=qk.default_calibration_qconfig())
        fx = qk.convert(qk.calibrate(prepared, calib))
        with torch.inference_mode(), epilogue.kernels("reference"):
            want = fx(x)
        fx_cuda = copy.deepcopy(fx).to(device)
        res: dict = {}
        for mode in ("reference", "compiled"):
            with torch.inference_mode(), epilogue.kernels(mode):
                t0 = time.perf_counter()
                got = fx_cuda(x.to(device))
                sync()
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(5):
                    got = fx_cuda(x.to(device))
                sync()
            same = torch.equal(got.cpu(), want)
            ok &= same
            res[mode] = {"bit_exact_vs_cpu": same, "first_call_s": round(first, 3),
                         "forward_s": round((time.perf_counter() - t0) / 5, 5)}
        with qk.set_march(MARCH):
            qat = qk.prepare(model, x[:1], qconfig=qk.default_qat_qconfig())
        qat.load_state_dict(prepared.state_dict())
        qat = qat.to(device).train()
        qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
        opt = torch.optim.SGD(qat.parameters(), lr=0.01)
        y = torch.randint(0, 10, (batch,), device=device)
        loss = torch.nn.functional.cross_entropy(qat(x.to(device)), y)
        loss.backward()
        opt.step()
        res["qat_step_loss_finite"] = bool(torch.isfinite(loss).item())
        ok &= res["qat_step_loss_finite"]
        out["nets"][name] = res
    out["ok"] = ok
    return out


if __name__ == "__main__":
    # python -m bench.gpu_check [cpu [net ...]]: a CPU dry run of the same steps
    args = sys.argv[1:]
    report = check(device=args[0] if args else "cuda",
                   nets=tuple(args[1:]) or ("demo", "resnet18_like"))
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)
