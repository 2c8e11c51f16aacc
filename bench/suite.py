"""Benchmark suite: configuration, measurement registries and the runner of ``python -m bench``.

Extension points (a new toolkit's figures are one function and one registry entry each):

* :data:`SPEED` -- ``(name, setup)``; ``setup(case)`` builds whatever it needs from a
  :class:`Case` (model copy, optimizer, converted model) and returns the zero-argument callable
  that is timed. Every entry is timed for every model and batch size, and its peak memory is
  measured (fresh process, see :mod:`bench.timing`) for the models at ``Config.memory_batch``.
* :data:`RATIOS` -- ``(ratio_name, numerator, denominator)`` over SPEED names (speed section:
  ``ratios`` from medians and ``ratios_from_min`` from minima; memory section: peak MiB).

The SPEED entries of one case are timed interleaved (round-robin, :func:`bench.timing.
measure_interleaved`), so load from other processes hits numerator and denominator alike.
* :data:`ACCURACY` -- ``(name, build)``; ``build(trained_float_model, split, cfg)`` returns a
  predictor ``x -> logits`` evaluated on the test set (accuracy and agreement with the float model).
* :data:`SECTIONS` -- top-level sections of the report, ``name -> fn(cfg) -> dict``.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from qatkit.data import Split, batches, load_digits, load_fashion_mnist

from .models import MODELS, count_macs, count_params
from .timing import measure_interleaved, peak_memory
from .torchao_flow import (
    BACKEND,
    float_forward,
    int8_forward,
    torchao_int8_model,
    torchao_qat_model,
    train_step,
)

__all__ = [
    "ACCURACY",
    "RATIOS",
    "SECTIONS",
    "SPEED",
    "Case",
    "Config",
    "make_case",
    "run",
]

MIB = 1024 * 1024


@dataclass(frozen=True)
class Config:
    """What one run measures. :meth:`full` and :meth:`quick` are the two presets."""

    quick: bool = False
    threads: int = 2
    seed: int = 0
    models: tuple[str, ...] = ("resnet18_like", "small_cnn")
    #: per-image input shape per model (quick mode shrinks ResNet to 3x64x64).
    input_shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 2
    rounds: int = 7
    #: timed seconds to aim for per function (short workloads get several calls per round).
    min_time_s: float = 1.0
    #: no new timing round starts after this many seconds per case (bounds a loaded machine).
    case_budget_s: float | None = 40.0
    calib_batches: int = 2
    #: batch size of the memory section; None skips it.
    memory_batch: int | None = 8
    #: "fashion-mnist" (falls back to digits when absent) or "digits".
    accuracy_dataset: str = "fashion-mnist"
    epochs: int = 1
    train_batch: int = 64
    train_lr: float = 0.1
    calib_images: int = 2000
    sections: tuple[str, ...] = ("models", "speed", "memory", "accuracy")

    @classmethod
    def full(cls, threads: int) -> Config:
        return cls(threads=threads, input_shapes={k: v[1] for k, v in MODELS.items()})

    @classmethod
    def quick_config(cls, threads: int) -> Config:
        """Seconds-long smoke run: small inputs, one timed call, digits instead of Fashion-MNIST."""
        shapes = {k: v[1] for k, v in MODELS.items()}
        shapes["resnet18_like"] = (3, 64, 64)  # layer4 stays 2x2, so batch-1 BatchNorm trains
        return cls(
            quick=True,
            threads=threads,
            input_shapes=shapes,
            batch_sizes=(1, 2),
            warmup=1,
            rounds=1,
            min_time_s=0.0,
            calib_batches=1,
            memory_batch=None,
            accuracy_dataset="digits",
            epochs=2,
            calib_images=256,
        )


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One model at one batch size, with fixed random inputs. Never mutate ``float_model``."""

    model_name: str
    batch: int
    image_shape: tuple[int, int, int]
    num_classes: int
    float_model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    #: calibration batches (same shape as ``x``) for post-training quantization.
    calib: list[torch.Tensor]
    lr: float = 0.01

    def fresh_model(self) -> nn.Module:
        return copy.deepcopy(self.float_model)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)


def _model(name: str, seed: int) -> tuple[nn.Module, int]:
    ctor, _shape, num_classes = MODELS[name]
    torch.manual_seed(seed)
    return ctor(), num_classes


def make_case(
    model_name: str, batch: int, image_shape: tuple[int, int, int], seed: int, calib_batches: int
) -> Case:
    """Seeded model and inputs in ``[0, 1)`` (the range of :mod:`qatkit.data` images)."""
    model, num_classes = _model(model_name, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, *image_shape, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    calib = [torch.rand(batch, *image_shape, generator=g) for _ in range(calib_batches)]
    return Case(model_name, batch, tuple(image_shape), num_classes, model, x, y, calib)


# ----------------------------------------------------------------------------- speed registry


def setup_float_forward(case: Case) -> Callable[[], object]:
    """float32 inference forward of the model as written (eval mode, BN not folded)."""
    model = case.fresh_model().eval()
    return lambda: float_forward(model, case.x)


def setup_float_train_step(case: Case) -> Callable[[], object]:
    """float32 forward + cross-entropy backward + SGD step (train mode)."""
    model = case.fresh_model().train()
    opt = case.optimizer(model)
    return lambda: train_step(model, opt, case.x, case.y)


def setup_torchao_qat_train_step(case: Case) -> Callable[[], object]:
    """torch.ao eager QAT step: fused conv-bn-relu, x86 default QAT qconfig, SGD."""
    model = torchao_qat_model(case.float_model)
    opt = case.optimizer(model)
    return lambda: train_step(model, opt, case.x, case.y)


def setup_torchao_int8_forward(case: Case) -> Callable[[], object]:
    """torch.ao converted int8 model (x86 engine, PTQ-calibrated on ``case.calib``) forward."""
    model = torchao_int8_model(case.float_model, case.calib)
    return lambda: int8_forward(model, case.x)


SPEED: list[tuple[str, Callable[[Case], Callable[[], object]]]] = [
    ("float_forward", setup_float_forward),
    ("float_train_step", setup_float_train_step),
    ("torchao_qat_train_step", setup_torchao_qat_train_step),
    ("torchao_int8_forward", setup_torchao_int8_forward),
]

RATIOS: list[tuple[str, str, str]] = [
    ("torchao_qat_step_over_float", "torchao_qat_train_step", "float_train_step"),
    ("torchao_int8_forward_over_float", "torchao_int8_forward", "float_forward"),
]


def _ratios(values: dict[str, float]) -> dict[str, float]:
    return {
        name: values[num] / values[den]
        for name, num, den in RATIOS
        if num in values and den in values and values[den] > 0
    }


def _round(x: float) -> float:
    return float(f"{x:.6g}")


# ----------------------------------------------------------------------------- sections


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def section_models(cfg: Config) -> dict[str, Any]:
    """Parameters and MACs per image (conv + linear, from forward hooks) at the input size used."""
    out = {}
    for name in cfg.models:
        model, num_classes = _model(name, cfg.seed)
        shape = cfg.input_shapes[name]
        macs = count_macs(model, shape)
        out[name] = {
            "input_shape": list(shape),
            "num_classes": num_classes,
            "params": count_params(model),
            "macs_per_image": macs["total"],
            "macs_conv": macs["conv"],
            "macs_linear": macs["linear"],
        }
    return out


def section_speed(cfg: Config) -> dict[str, Any]:
    """Wall time of every SPEED entry per model and batch size (interleaved), and the RATIOS."""
    out: dict[str, Any] = {}
    for name in cfg.models:
        out[name] = {}
        for batch in cfg.batch_sizes:
            case = make_case(name, batch, cfg.input_shapes[name], cfg.seed, cfg.calib_batches)
            fns = {}
            for mname, setup in SPEED:
                _log(f"speed {name} batch {batch}: set up {mname}")
                fns[mname] = setup(case)
            _log(f"speed {name} batch {batch}: timing {len(fns)} functions interleaved")
            timed = measure_interleaved(
                fns,
                cfg.warmup,
                cfg.rounds,
                min_time_s=cfg.min_time_s,
                budget_s=cfg.case_budget_s,
            )
            del fns
            res: dict[str, Any] = {
                mname: {
                    "median_s": _round(t["median_s"]),
                    "min_s": _round(t["min_s"]),
                    "max_s": _round(max(t["all"])),
                    "repeats": len(t["all"]),
                }
                for mname, t in timed.items()
            }
            res["ratios"] = {
                k: _round(v)
                for k, v in _ratios({k: v["median_s"] for k, v in timed.items()}).items()
            }
            res["ratios_from_min"] = {
                k: _round(v) for k, v in _ratios({k: v["min_s"] for k, v in timed.items()}).items()
            }
            out[name][f"batch_{batch}"] = res
    return out


def memory_factory(
    measurement: str, model_name: str, batch: int, image_shape: list[int], threads: int, seed: int
) -> Callable[[], object]:
    """Runs in the peak_memory child: set threads, build the case, set up one SPEED entry."""
    torch.set_num_threads(threads)
    case = make_case(model_name, batch, tuple(image_shape), seed, calib_batches=1)  # type: ignore[arg-type]
    return dict(SPEED)[measurement](case)


def section_memory(cfg: Config) -> dict[str, Any]:
    """Peak extra RSS of the first call of each SPEED entry, each in a fresh process."""
    if cfg.memory_batch is None:
        return {"skipped": "quick mode" if cfg.quick else "memory_batch is None"}
    out: dict[str, Any] = {"batch": cfg.memory_batch, "unit": "MiB"}
    for name in cfg.models:
        res: dict[str, Any] = {}
        method = ""
        for mname, _setup in SPEED:
            _log(f"memory {name} batch {cfg.memory_batch}: {mname}")
            r = peak_memory(
                memory_factory,
                mname,
                name,
                cfg.memory_batch,
                list(cfg.input_shapes[name]),
                cfg.threads,
                cfg.seed,
            )
            res[mname] = _round(r["peak_delta_bytes"] / MIB)
            method = r["method"]
        res["ratios"] = {k: _round(v) for k, v in _ratios(res).items()}
        res["method"] = method
        out[name] = res
    return out


# ----------------------------------------------------------------------------- accuracy


def train_float(model: nn.Module, split: Split, cfg: Config) -> float:
    """SGD (momentum 0.9, Nesterov, wd 5e-4) with a one-cycle schedule; returns seconds."""
    steps_per_epoch = math.ceil(len(split.x_train) / cfg.train_batch)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.train_lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.train_lr, total_steps=steps_per_epoch * cfg.epochs, pct_start=0.15
    )
    model.train()
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        for xb, yb in batches(
            split.x_train, split.y_train, cfg.train_batch, True, cfg.seed + epoch
        ):
            train_step(model, opt, xb, yb)
            sched.step()
    model.eval()
    return time.perf_counter() - t0


def calibration_batches(split: Split, cfg: Config, batch_size: int = 200) -> list[torch.Tensor]:
    """The first ``cfg.calib_images`` training images of a seeded shuffle, in batches."""
    out, n = [], 0
    for xb, _ in batches(split.x_train, split.y_train, batch_size, True, cfg.seed + 1000):
        xb = xb[: cfg.calib_images - n]
        out.append(xb)
        n += len(xb)
        if n >= cfg.calib_images:
            break
    return out


def build_float(model: nn.Module, split: Split, cfg: Config) -> Callable[[torch.Tensor], Any]:
    return model


def build_torchao_int8(
    model: nn.Module, split: Split, cfg: Config
) -> Callable[[torch.Tensor], Any]:
    """torch.ao PTQ (x86): fuse, calibrate on ``cfg.calib_images`` training images, convert."""
    return torchao_int8_model(model, calibration_batches(split, cfg))


ACCURACY: list[tuple[str, Callable[[nn.Module, Split, Config], Callable[[torch.Tensor], Any]]]] = [
    ("float", build_float),
    ("torchao_int8", build_torchao_int8),
]


def _predict(predictor: Callable[[torch.Tensor], Any], x: torch.Tensor) -> torch.Tensor:
    preds = []
    with torch.inference_mode():
        for i in range(0, len(x), 1000):
            preds.append(predictor(x[i : i + 1000]).argmax(1))
    return torch.cat(preds)


def load_accuracy_split(cfg: Config) -> tuple[Split, str | None]:
    if cfg.accuracy_dataset == "fashion-mnist":
        try:
            return load_fashion_mnist(), None
        except FileNotFoundError as e:
            return load_digits(seed=cfg.seed), str(e)
    if cfg.accuracy_dataset == "digits":
        return load_digits(seed=cfg.seed), None
    raise ValueError(f"unknown accuracy dataset {cfg.accuracy_dataset!r}")


def section_accuracy(cfg: Config) -> dict[str, Any]:
    """Train small_cnn in float, then evaluate every ACCURACY entry on the test set."""
    split, fallback = load_accuracy_split(cfg)
    if fallback is not None:
        _log(f"Fashion-MNIST missing, using digits: {fallback}")
        cfg = replace(cfg, epochs=15)
    _log(f"accuracy: training small_cnn on {split.name} for {cfg.epochs} epoch(s)")
    torch.manual_seed(cfg.seed)
    model = MODELS["small_cnn"][0]()
    train_s = train_float(model, split, cfg)
    out: dict[str, Any] = {
        "dataset": split.name,
        "model": "small_cnn",
        "train_images": len(split.x_train),
        "test_images": len(split.x_test),
        "epochs": cfg.epochs,
        "train_batch": cfg.train_batch,
        "train_s": _round(train_s),
        "calib_images": min(cfg.calib_images, len(split.x_train)),
    }
    if fallback is not None:
        out["fallback_reason"] = fallback
    reference = None
    results: dict[str, Any] = {}
    for name, build in ACCURACY:
        _log(f"accuracy: {name}")
        t0 = time.perf_counter()
        predictor = build(model, split, cfg)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = _predict(predictor, split.x_test)
        eval_s = time.perf_counter() - t0
        if reference is None:
            reference = pred
        results[name] = {
            "accuracy": _round((pred == split.y_test).double().mean().item()),
            "agreement_with_float": _round((pred == reference).double().mean().item()),
            "build_s": _round(build_s),
            "eval_s": _round(eval_s),
        }
    out["results"] = results
    return out


SECTIONS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "models": section_models,
    "speed": section_speed,
    "memory": section_memory,
    "accuracy": section_accuracy,
}


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run(cfg: Config) -> dict[str, Any]:
    """Run the configured sections; returns the whole report as a JSON-ready dict."""
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "meta": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            # other processes on the machine skew timings (2 threads on 2 busy cores: 10-100x)
            "loadavg_1min_start": _loadavg(),
            "quantized_engine": BACKEND,
            "quick": cfg.quick,
            "timing": {
                "warmup": cfg.warmup,
                "rounds": cfg.rounds,
                "case_budget_s": cfg.case_budget_s,
                "min_time_s": cfg.min_time_s,
                "interleaved": True,
                "ratios": "median (ratios) and min (ratios_from_min)",
            },
        }
    }
    for name in cfg.sections:
        report[name] = SECTIONS[name](cfg)
    report["meta"]["loadavg_1min_end"] = _loadavg()
    report["meta"]["total_s"] = _round(time.perf_counter() - t0)
    return report
