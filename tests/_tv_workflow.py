"""The whole workflow on a real model definition, unmodified: prepare (no stubs, no
FloatFunctional), calibrate on real photos, one QAT step with backward, convert, fixed-point
forward, checkpoint round trip. Shared by the torchvision tests and the SQNR table in
docs/models.md (``python -m tests._tv_workflow``)."""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import qatkit as qk


def photos(size: int, n: int = 8) -> torch.Tensor:
    """``n`` real photos (scikit-image's sample images and crops of them), resized to
    ``size`` x ``size`` and normalised like ImageNet."""
    import skimage.data as data
    imgs = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                 "hubble_deep_field"):
        img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255
        h, w = img.shape[1:]
        for crop in (img, img[:, : h // 2, : w // 2]):
            imgs.append(F.interpolate(crop[None], size=(size, size), mode="bilinear",
                                      align_corners=False)[0])
    x = torch.stack(imgs[:n])
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - got|^2) in dB (inf when equal)."""
    noise = (ref.double() - got.double()).pow(2).sum().item()
    signal = ref.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def settle_batch_norm(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics of every BatchNorm from ``x`` (weights=None leaves mean 0 / var 1,
    with which the activations of deep random-init nets shrink to 0 and every scale is
    degenerate): a cumulative average over the photos, the model then back in eval()."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 2):
            model(x[i:i + 2])
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def run(model: nn.Module, size: int, march: str = "nash-e", fuse_first: bool = False
        ) -> dict[str, Any]:
    """The workflow on ``model`` (eval-mode float definition, weights=None); returns the
    fixed-point output's SQNR against the fake-quant model after the QAT step, the calibrated
    (post-training) fixed point's SQNR against float, and the warnings."""
    torch.manual_seed(0)
    model.eval()
    x = photos(size)
    settle_batch_norm(model, x)  # before fuse_model(), which folds the BNs it finds
    with torch.no_grad():
        ref = model(x)
    if fuse_first:
        model.fuse_model()
    qk.set_march(march)
    with warnings.catch_warnings(record=True) as caught, tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("always")
        cal = qk.prepare(model, x[:2], qconfig=qk.default_calibration_qconfig())
        qk.calibrate(cal, [x[i:i + 2] for i in range(0, len(x), 2)])
        with torch.no_grad(), warnings.catch_warnings():  # the post-training fixed point, as
            warnings.simplefilter("ignore")  # torch.ao's int8 is measured (its QK105 notes
            ptq = qk.convert(cal)(x)  # on random weights are not prepare's warnings)
        qat = qk.prepare(model, x[:2], qconfig=qk.default_qat_qconfig())
        qat.load_state_dict(cal.state_dict())
        qat.train()
        opt = torch.optim.SGD(qat.parameters(), lr=1e-4)
        out = qat(x[:2])
        out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).mean().backward()
        opt.step()
        qat.eval()
        with torch.no_grad():
            fake = qat(x)
        fixed = qk.convert(qat)
        with torch.no_grad():
            got = fixed(x)
        path = os.path.join(tmp, "fixed.pt")
        qk.checkpoint.save(fixed, path)
        again = qk.load_quantized(model, path, x[:2])
        with torch.no_grad():
            same = torch.equal(again(x), got)
    qk_warnings = [str(w.message) for w in caught if isinstance(w.message, qk.QatkitWarning)]
    return {"sqnr_db": sqnr(fake, got), "float_sqnr_db": sqnr(ref, ptq),
            "reload_identical": same, "warnings": qk_warnings,
            "ops": sum(1 for n, _ in fixed.named_modules() if n.startswith("qatkit_ops."))}


MODELS: dict[str, tuple[str, int]] = {  # name -> (builder in torchvision.models, input size)
    "resnet18": ("resnet18", 64), "resnet50": ("resnet50", 64),
    "mobilenet_v2": ("mobilenet_v2", 64), "mobilenet_v3_large": ("mobilenet_v3_large", 64),
    "efficientnet_b0": ("efficientnet_b0", 64), "regnet_x_400mf": ("regnet_x_400mf", 64),
    "mnasnet0_5": ("mnasnet0_5", 64), "squeezenet1_1": ("squeezenet1_1", 64),
    "vgg11_bn": ("vgg11_bn", 32), "densenet121": ("densenet121", 64),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", 64), "googlenet": ("googlenet", 64),
    "inception_v3": ("inception_v3", 299), "convnext_tiny": ("convnext_tiny", 64),
}
QUANTIZABLE = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "googlenet",
               "inception_v3", "shufflenet_v2_x1_0")


def build(name: str, quantizable: bool = False) -> nn.Module:
    from tests._tv_import import import_torchvision
    tv = import_torchvision()
    builder, _ = MODELS[name]
    ns = tv.models.quantization if quantizable else tv.models
    kwargs: dict[str, Any] = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True
    if quantizable:
        kwargs["quantize"] = False
    return getattr(ns, builder)(**kwargs)


def torch_ao_sqnr(name: str) -> float:
    """torch.ao eager int8 (x86 engine) of torchvision's quantizable definition against its
    float output, calibrated on the same photos as :func:`run` (the peer figure of
    docs/models.md)."""
    import torch.ao.quantization as tq
    torch.manual_seed(0)
    model = build(name, quantizable=True).eval()
    x = photos(MODELS[name][1])
    settle_batch_norm(model, x)
    with torch.no_grad():
        ref = model(x)
    model.fuse_model()
    torch.backends.quantized.engine = "x86"
    model.qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare(model, inplace=True)
        with torch.no_grad():
            for i in range(0, len(x), 2):
                model(x[i:i + 2])
        tq.convert(model, inplace=True)
        with torch.no_grad():
            return sqnr(ref, model(x))


if __name__ == "__main__":
    import sys
    import time
    names = sys.argv[1:] or list(MODELS)
    for name in names:
        for quantizable, fused in ((False, False), (True, False), (True, True)):
            if quantizable and name not in QUANTIZABLE:
                continue
            t = time.time()
            try:
                r = run(build(name, quantizable), MODELS[name][1], fuse_first=fused)
                res = f"sqnr {r['sqnr_db']:6.1f} dB ptq vs float {r['float_sqnr_db']:6.1f} dB " \
                      f"reload {r['reload_identical']} " \
                      f"ops {r['ops']} warnings {len(r['warnings'])} {r['warnings'][:1]}"
            except Exception as e:
                res = f"FAIL {type(e).__name__}: {str(e)[:300]}"
            form = "quantizable" + ("+fuse_model" if fused else "") if quantizable else "plain"
            print(f"{name:20s} {form:24s} {time.time() - t:5.1f}s {res}", flush=True)
        if name in QUANTIZABLE:
            print(f"{name:20s} torch.ao int8 vs float {torch_ao_sqnr(name):6.1f} dB", flush=True)
