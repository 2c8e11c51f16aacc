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

import qatkit as qk
from qatkit.demo.data import Split, batches, load_digits, load_fashion_mnist
from qatkit.fixed_point import epilogue

from . import pt2e_flow
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
    #: training images of the short qatkit QAT run in the accuracy section (None: one epoch).
    qat_images: int | None = 20000
    qat_lr: float = 0.002
    sections: tuple[str, ...] = ("models", "speed", "memory", "accuracy")
    #: torch.compile the peers and compiled entries that need it (pt2e int8, compiled QAT
    #: steps); quick mode runs them eagerly, since Inductor compiles take 10-30 s each.
    compile: bool = True
    #: "cpu" or "cuda" (models and inputs there; CPU-only peers are left out on cuda).
    device: str = "cpu"

    @classmethod
    def full(cls, threads: int) -> Config:
        return cls(threads=threads, input_shapes={k: v[1] for k, v in MODELS.items()})

    @classmethod
    def quick_config(cls, threads: int) -> Config:
        """Seconds-long smoke run: small inputs, one batch size, one call per entry (no warm-up:
        the figure includes first-call costs), digits instead of Fashion-MNIST and one short
        epoch, nothing compiled (peers that need torch.compile run eagerly)."""
        shapes = {k: v[1] for k, v in MODELS.items()}
        shapes["resnet18_like"] = (3, 32, 32)  # layer4 is 1x1: BatchNorm trains on batch 2
        return cls(
            quick=True,
            threads=threads,
            input_shapes=shapes,
            batch_sizes=(2,),
            warmup=0,
            rounds=1,
            min_time_s=0.0,
            calib_batches=1,
            memory_batch=None,
            accuracy_dataset="digits",
            epochs=1,
            calib_images=128,
            qat_images=256,
            compile=False,
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
    #: per-case cache for expensive setup shared by several SPEED entries (e.g. calibration).
    cache: dict[str, Any] = field(default_factory=dict)
    #: see :attr:`Config.compile`.
    compile: bool = True
    device: str = "cpu"

    def fresh_model(self) -> nn.Module:
        return copy.deepcopy(self.float_model)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)


def _model(name: str, seed: int) -> tuple[nn.Module, int]:
    ctor, _shape, num_classes = MODELS[name]
    torch.manual_seed(seed)
    return ctor(), num_classes


def make_case(
    model_name: str,
    batch: int,
    image_shape: tuple[int, int, int],
    seed: int,
    calib_batches: int,
    compile: bool = True,
    device: str = "cpu",
) -> Case:
    """Seeded model and inputs in ``[0, 1)`` (the range of :mod:`qatkit.demo.data` images)."""
    model, num_classes = _model(model_name, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, *image_shape, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    calib = [torch.rand(batch, *image_shape, generator=g) for _ in range(calib_batches)]
    if device != "cpu":
        model, x, y = model.to(device), x.to(device), y.to(device)
        calib = [c.to(device) for c in calib]
    return Case(
        model_name, batch, tuple(image_shape), num_classes, model, x, y, calib, compile=compile,
        device=device,
    )


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


#: ``setup(case)`` may return None: the entry does not apply to that case (left out).
SPEED: list[tuple[str, Callable[[Case], Callable[[], object] | None]]] = [
    ("float_forward", setup_float_forward),
    ("float_train_step", setup_float_train_step),
    ("torchao_qat_train_step", setup_torchao_qat_train_step),
    ("torchao_int8_forward", setup_torchao_int8_forward),
]

RATIOS: list[tuple[str, str, str]] = [
    ("torchao_qat_step_over_float", "torchao_qat_train_step", "float_train_step"),
    ("torchao_int8_forward_over_float", "torchao_int8_forward", "float_forward"),
]


def setup_pt2e_int8_forward(case: Case) -> Callable[[], object]:
    """torchao pt2e int8 model (export, X86InductorQuantizer, PTQ-calibrated on ``case.calib``,
    convert_pt2e, torch.compile with freezing) forward; eager q/dq graph when not compiling.
    The compile happens in the first (warm-up) call."""
    run = pt2e_flow.pt2e_int8_model(case.float_model, case.calib, case.x, compile=case.compile)
    return lambda: run(case.x)


def setup_pt2e_qat_train_step(case: Case) -> Callable[[], object]:
    """torchao pt2e QAT step: exported train model, prepare_qat_pt2e (x86 Inductor QAT
    config), eager forward + backward + SGD on the GraphModule."""
    model = pt2e_flow.pt2e_qat_model(case.float_model, case.x)
    opt = case.optimizer(model)
    return lambda: train_step(model, opt, case.x, case.y)


if pt2e_flow.available():  # the optional ``bench`` extra
    SPEED += [
        ("pt2e_int8_forward", setup_pt2e_int8_forward),
        ("pt2e_qat_train_step", setup_pt2e_qat_train_step),
    ]
    RATIOS += [
        ("pt2e_int8_forward_over_float", "pt2e_int8_forward", "float_forward"),
        ("pt2e_qat_step_over_float", "pt2e_qat_train_step", "float_train_step"),
    ]


# ----------------------------------------------------------------------------- qatkit entries

#: the march every qatkit figure is measured on (BPU-style NPU, int8 activations).
MARCH = "nash-e"


def _qatkit_prepare(case: Case, qconfig: qk.QConfig) -> nn.Module:
    with qk.set_march(MARCH):
        return qk.prepare(case.float_model, case.x[:1], qconfig=qconfig)


def qatkit_calibrated(case: Case, observer: str = "mse") -> nn.Module:
    """prepare (default calibration qconfig: MSE histogram observers) + qk.calibrate on
    ``case.calib``; the model is left in VALIDATION state."""
    key = f"qatkit_calibrated_{observer}"
    if key not in case.cache:
        model = _qatkit_prepare(case, qk.default_calibration_qconfig(observer=observer))
        case.cache[key] = qk.calibrate(model, case.calib)
    return copy.deepcopy(case.cache[key])


def _fixedpoint_forward(case: Case, kernels: str) -> Callable[[], object]:
    calib = qatkit_calibrated(case)
    state: dict[str, nn.Module] = {}

    def run() -> torch.Tensor:
        if "fx" not in state:
            state["fx"] = qk.convert(calib, inplace=True)
        with torch.inference_mode(), epilogue.kernels(kernels):
            return state["fx"](case.x)

    return run


def setup_qatkit_fixedpoint_forward(case: Case) -> Callable[[], object]:
    """qatkit fixed-point (bit-exact integer) model forward on the default (reference)
    epilogues. The FIRST call converts the calibrated model in place
    (``qk.convert(inplace=True)``) and runs it, so the memory section measures convert +
    fixed-point inference; the timed calls (after warm-up) are forwards."""
    return _fixedpoint_forward(case, "reference")


def setup_qatkit_fixedpoint_forward_compiled(case: Case) -> Callable[[], object] | None:
    """:func:`setup_qatkit_fixedpoint_forward` on the opt-in compiled epilogues
    (``QATKIT_KERNELS=compiled``; compiled in the warm-up calls). None (left out) when the run
    does not compile (quick mode) or Inductor cannot generate CPU code here."""
    if not case.compile or (case.x.device.type == "cpu" and not epilogue.compile_available()):
        return None
    return _fixedpoint_forward(case, "compiled")


def _qatkit_qat_model(case: Case) -> nn.Module:
    calib = qatkit_calibrated(case)
    with qk.set_march(MARCH):
        model = qk.prepare(case.float_model, case.x[:1], qconfig=qk.default_qat_qconfig())
    model.load_state_dict(calib.state_dict())
    model.train()
    qk.set_fake_quantize(model, qk.FakeQuantState.QAT)
    return model


def setup_qatkit_qat_train_step(case: Case) -> Callable[[], object]:
    """qatkit QAT step: prepare(default_qat_qconfig) (BN folded, the vendor's fuse_bn mode),
    calibrated scales loaded, train(), QAT state, SGD step."""
    model = _qatkit_qat_model(case)
    opt = case.optimizer(model)
    return lambda: train_step(model, opt, case.x, case.y)


#: where the QAT step is also timed under torch.compile (model -> batch sizes; None: all). The
#: prepared model compiles to one graph (tests/test_compile_qat.py); Inductor takes 1-3 minutes
#: for ResNet's forward and backward on 2 cores, so only its headline batch is compiled.
COMPILED_QAT_MODELS: dict[str, tuple[int, ...] | None] = {"small_cnn": None,
                                                         "resnet18_like": (8,)}


def setup_qatkit_qat_train_step_compiled(case: Case) -> Callable[[], object] | None:
    """:func:`setup_qatkit_qat_train_step` with ``torch.compile(model)`` (Inductor; compiled in
    the warm-up calls). None (left out) when the run does not compile (quick mode) and for
    cases not in :data:`COMPILED_QAT_MODELS`."""
    if not case.compile or case.model_name not in COMPILED_QAT_MODELS:
        return None
    batches = COMPILED_QAT_MODELS[case.model_name]
    if batches is not None and case.batch not in batches:
        return None
    model = _qatkit_qat_model(case)
    opt = case.optimizer(model)
    run = torch.compile(model)
    return lambda: train_step(run, opt, case.x, case.y)


def _calibration_forward(case: Case, observer: str) -> Callable[[], object]:
    model = _qatkit_prepare(case, qk.default_calibration_qconfig(observer=observer)).eval()
    qk.set_fake_quantize(model, qk.FakeQuantState.CALIBRATION)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(case.x)

    return run


def setup_qatkit_calibration_forward(case: Case) -> Callable[[], object]:
    """One calibration batch: prepared model in CALIBRATION state (default MSE histogram
    observers), eval, no_grad."""
    return _calibration_forward(case, "mse")


def setup_qatkit_calibration_minmax_forward(case: Case) -> Callable[[], object]:
    """As :func:`setup_qatkit_calibration_forward` with min/max observers."""
    return _calibration_forward(case, "minmax")


def setup_float_eval_no_grad(case: Case) -> Callable[[], object]:
    """float32 eval forward under ``torch.no_grad`` (what calibration is compared with)."""
    model = case.fresh_model().eval()

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(case.x)

    return run


def setup_qatkit_doctor_check(case: Case) -> Callable[[], object]:
    """``qk.doctor.check`` of the float model (fuses a copy, traces one forward on ``case.x``,
    runs every rule of the float stage)."""
    model = case.fresh_model().eval()

    def run() -> object:
        with qk.set_march(MARCH):
            return qk.doctor.check(model, case.x)

    return run


SPEED += [
    ("float_eval_no_grad", setup_float_eval_no_grad),
    ("qatkit_fixedpoint_forward", setup_qatkit_fixedpoint_forward),
    ("qatkit_fixedpoint_forward_compiled", setup_qatkit_fixedpoint_forward_compiled),
    ("qatkit_qat_train_step", setup_qatkit_qat_train_step),
    ("qatkit_qat_train_step_compiled", setup_qatkit_qat_train_step_compiled),
    ("qatkit_calibration_forward", setup_qatkit_calibration_forward),
    ("qatkit_calibration_minmax_forward", setup_qatkit_calibration_minmax_forward),
    ("qatkit_doctor_check", setup_qatkit_doctor_check),
]
RATIOS += [
    ("fixedpoint_over_float", "qatkit_fixedpoint_forward", "float_forward"),
    ("fixedpoint_over_torchao_int8", "qatkit_fixedpoint_forward", "torchao_int8_forward"),
    ("fixedpoint_compiled_over_float", "qatkit_fixedpoint_forward_compiled", "float_forward"),
    ("fixedpoint_compiled_over_reference", "qatkit_fixedpoint_forward_compiled",
     "qatkit_fixedpoint_forward"),
    ("fixedpoint_compiled_over_pt2e_int8", "qatkit_fixedpoint_forward_compiled",
     "pt2e_int8_forward"),
    ("qat_step_over_float", "qatkit_qat_train_step", "float_train_step"),
    ("qat_step_over_torchao_qat_step", "qatkit_qat_train_step", "torchao_qat_train_step"),
    ("compiled_qat_step_over_float", "qatkit_qat_train_step_compiled", "float_train_step"),
    ("compiled_qat_step_over_eager", "qatkit_qat_train_step_compiled", "qatkit_qat_train_step"),
    ("fixedpoint_over_pt2e_int8", "qatkit_fixedpoint_forward", "pt2e_int8_forward"),
    ("qat_step_over_pt2e_qat_step", "qatkit_qat_train_step", "pt2e_qat_train_step"),
    # throughput ratio = time of float eval / time of calibration
    ("calibration_over_float_eval", "float_eval_no_grad", "qatkit_calibration_forward"),
    ("calibration_minmax_over_float_eval", "float_eval_no_grad",
     "qatkit_calibration_minmax_forward"),
    ("doctor_over_forward", "qatkit_doctor_check", "float_forward"),
]
#: SPEED entries the memory section skips (no memory figure: same workload as another entry,
#: or not a model run); saves fresh processes on a 10-minute budget.
MEMORY_SKIP = {
    "float_eval_no_grad",
    "qatkit_calibration_forward",
    "qatkit_calibration_minmax_forward",
    "qatkit_doctor_check",
    "qatkit_qat_train_step_compiled",
    "qatkit_fixedpoint_forward_compiled",
    # peers compiled by Inductor: the compiler's own memory would dominate a first-call figure
    "pt2e_int8_forward",
    "pt2e_qat_train_step",
}
#: memory-section ratio names (peak MiB) that differ from the speed ratio of the same pair.
MEMORY_RATIO_NAMES = {"fixedpoint_over_float": "memory_fixedpoint_over_float"}

#: headline figures: JSON key -> (section, ratio name, target as (op, bound), or None for a
#: figure reported beside the targets)
HEADLINE: dict[str, tuple[str, str, tuple[str, float] | None]] = {
    "fixedpoint_over_float": ("speed", "fixedpoint_over_float", ("<=", 0.5)),
    "fixedpoint_over_torchao_int8": ("speed", "fixedpoint_over_torchao_int8", ("<=", 1.0)),
    "fixedpoint_over_pt2e_int8": ("speed", "fixedpoint_over_pt2e_int8", ("<=", 1.0)),
    # the opt-in compiled epilogues (QATKIT_KERNELS=compiled), beside the default path's
    "fixedpoint_compiled_over_float": ("speed", "fixedpoint_compiled_over_float", None),
    "fixedpoint_compiled_over_reference": (
        "speed", "fixedpoint_compiled_over_reference", None),
    "qat_step_over_float": ("speed", "qat_step_over_float", ("<=", 1.15)),
    "qat_step_over_pt2e_qat_step": ("speed", "qat_step_over_pt2e_qat_step", None),
    # the QAT step under torch.compile (Inductor), beside the eager one
    "compiled_qat_step_over_eager": ("speed", "compiled_qat_step_over_eager", None),
    "compiled_qat_step_over_float": ("speed", "compiled_qat_step_over_float", None),
    "torchao_qat_step_over_float": ("speed", "torchao_qat_step_over_float", None),
    "calibration_over_float_eval": ("speed", "calibration_over_float_eval", (">=", 0.9)),
    "calibration_minmax_over_float_eval": (
        "speed", "calibration_minmax_over_float_eval", (">=", 0.9)),
    "doctor_over_forward": ("speed", "doctor_over_forward", ("<=", 3.0)),
    "memory_fixedpoint_over_float": ("memory", "memory_fixedpoint_over_float", ("<=", 0.75)),
}


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
            case = make_case(
                name, batch, cfg.input_shapes[name], cfg.seed, cfg.calib_batches, cfg.compile,
                cfg.device,
            )
            fns = {}
            for mname, setup in SPEED:
                if cfg.device != "cpu" and mname in CPU_ONLY:
                    continue
                _log(f"speed {name} batch {batch}: set up {mname}")
                fn = setup(case)
                if fn is None:  # this entry does not apply to this case
                    continue
                fns[mname] = _synchronized(fn) if cfg.device == "cuda" else fn
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


#: SPEED entries with CPU kernels only (x86 quantized engines), left out on other devices.
CPU_ONLY = {"torchao_qat_train_step", "torchao_int8_forward", "pt2e_int8_forward",
            "pt2e_qat_train_step"}


def _synchronized(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` that waits for the CUDA stream: the timed interval is the work, not the launch."""

    def run() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


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
            if mname in MEMORY_SKIP:
                continue
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
        ratios = _ratios(res)
        for speed_name, memory_name in MEMORY_RATIO_NAMES.items():
            if speed_name in ratios:
                ratios[memory_name] = ratios[speed_name]
        res["ratios"] = {k: _round(v) for k, v in ratios.items()}
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


def build_pt2e_int8(model: nn.Module, split: Split, cfg: Config) -> Callable[[torch.Tensor], Any]:
    """torchao pt2e PTQ (x86 Inductor quantizer): export with a symbolic batch, calibrate on the
    same ``cfg.calib_images`` training images as torch.ao and qatkit, convert, compile."""
    calib = calibration_batches(split, cfg)
    return pt2e_flow.pt2e_int8_model(
        model, calib, calib[0], compile=cfg.compile, dynamic_batch=True
    )


def _qatkit_calibrated_on(model: nn.Module, split: Split, cfg: Config) -> nn.Module:
    with qk.set_march(MARCH):
        calib = qk.prepare(model, split.x_train[:2], qconfig=qk.default_calibration_qconfig())
    return qk.calibrate(calib, calibration_batches(split, cfg))


def build_qatkit_calibrated(
    model: nn.Module, split: Split, cfg: Config
) -> Callable[[torch.Tensor], Any]:
    """qatkit PTQ: prepare (MSE observers), calibrate on the same ``cfg.calib_images`` training
    images as torch.ao, convert to the bit-exact fixed-point model."""
    return qk.convert(_qatkit_calibrated_on(model, split, cfg))


def build_qatkit_qat(model: nn.Module, split: Split, cfg: Config) -> Callable[[torch.Tensor], Any]:
    """qatkit QAT from the calibrated scales: ``cfg.qat_images`` training images (one shuffled
    pass, SGD momentum 0.9, cosine lr from ``cfg.qat_lr``), then convert to fixed point."""
    calib = _qatkit_calibrated_on(model, split, cfg)
    with qk.set_march(MARCH):
        qat = qk.prepare(model, split.x_train[:2], qconfig=qk.default_qat_qconfig())
    qat.load_state_dict(calib.state_dict())
    qat.train()
    qk.set_fake_quantize(qat, qk.FakeQuantState.QAT)
    n_images = len(split.x_train) if cfg.qat_images is None else cfg.qat_images
    steps = max(1, min(n_images, len(split.x_train)) // cfg.train_batch)
    opt = torch.optim.SGD(qat.parameters(), lr=cfg.qat_lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    it = batches(split.x_train, split.y_train, cfg.train_batch, True, cfg.seed + 2000)
    for _, (xb, yb) in zip(range(steps), it, strict=False):
        train_step(qat, opt, xb, yb)
        sched.step()
    qat.eval()
    qk.set_fake_quantize(qat, qk.FakeQuantState.VALIDATION)
    return qk.convert(qat)


ACCURACY: list[tuple[str, Callable[[nn.Module, Split, Config], Callable[[torch.Tensor], Any]]]] = [
    ("float", build_float),
    ("calibrated", build_qatkit_calibrated),
    ("qat", build_qatkit_qat),
    ("torchao_int8", build_torchao_int8),
]
if pt2e_flow.available():
    ACCURACY.append(("pt2e_int8", build_pt2e_int8))


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
        try:
            t0 = time.perf_counter()
            predictor = build(model, split, cfg)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            pred = _predict(predictor, split.x_test)
            eval_s = time.perf_counter() - t0
        except Exception as e:  # a peer's failure must not lose the whole run's figures
            if name == "float":
                raise
            _log(f"accuracy: {name} failed: {type(e).__name__}: {str(e)[:300]}")
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
            continue
        if reference is None:
            reference = pred
        results[name] = {
            "accuracy": _round((pred == split.y_test).double().mean().item()),
            "agreement_with_float": _round((pred == reference).double().mean().item()),
            "build_s": _round(build_s),
            "eval_s": _round(eval_s),
        }
    out["results"] = results
    for name in results:  # the headline accuracies, one number each (None: it failed)
        out[name] = results[name].get("accuracy")
    out["qat_images"] = (
        len(split.x_train) if cfg.qat_images is None else min(cfg.qat_images, len(split.x_train))
    )
    return out


SECTIONS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "models": section_models,
    "speed": section_speed,
    "memory": section_memory,
    "accuracy": section_accuracy,
}


HEADLINE_MODEL = "resnet18_like"
HEADLINE_BATCH = 8


def _headline_batch(per_batch: dict[str, Any]) -> str | None:
    want = f"batch_{HEADLINE_BATCH}"
    if want in per_batch:
        return want
    keys = sorted(per_batch, key=lambda k: int(k.split("_")[1]))  # quick mode: the largest
    return keys[-1] if keys else None


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """Top-level figures: the value for the large model at batch 8 (the largest batch in quick
    mode), its target and whether it is met, and ``details`` for every model and batch."""
    out: dict[str, Any] = {}
    for key, (section, ratio, target) in HEADLINE.items():
        sec = report.get(section)
        details: dict[str, Any] = {}
        value = None
        batch_used = None
        if section == "speed" and isinstance(sec, dict):
            for model, per_batch in sec.items():
                details[model] = {b: r["ratios"].get(ratio) for b, r in per_batch.items()}
            if HEADLINE_MODEL in sec:
                batch_used = _headline_batch(sec[HEADLINE_MODEL])
                if batch_used is not None:
                    value = details[HEADLINE_MODEL][batch_used]
        elif section == "memory" and isinstance(sec, dict) and "skipped" not in sec:
            batch_used = f"batch_{sec['batch']}"
            for model, res in sec.items():
                if isinstance(res, dict):
                    details[model] = {batch_used: res["ratios"].get(ratio)}
            if HEADLINE_MODEL in details:
                value = details[HEADLINE_MODEL][batch_used]
        met = None
        if value is not None and target is not None:
            op, bound = target
            met = value <= bound if op == "<=" else value >= bound
        out[key] = {
            "value": value,
            "model": HEADLINE_MODEL,
            "batch": batch_used,
            "target": None if target is None else f"{target[0]} {target[1]}",
            "met": met,
            "details": details,
        }
    return out


def cost_per_mac(report: dict[str, Any]) -> dict[str, Any]:
    """Seconds per multiply-accumulate (median time / (MACs per image * batch)) of every SPEED
    entry, per model and batch, and how it grows from the small to the large model."""
    speed, models = report["speed"], report["models"]
    out: dict[str, Any] = {"unit": "ns per MAC"}
    for model, per_batch in speed.items():
        macs = models[model]["macs_per_image"]
        out[model] = {
            b: {
                m: _round(r[m]["median_s"] / (macs * int(b.split("_")[1])) * 1e9)
                for m, _ in SPEED
                if m in r
            }
            for b, r in per_batch.items()
        }
    small, large = "small_cnn", HEADLINE_MODEL
    if small in out and large in out:
        growth: dict[str, Any] = {}
        for b in out[large]:
            if b in out[small]:
                growth[b] = {
                    m: _round(out[large][b][m] / out[small][b][m])
                    for m in out[large][b]
                    if m in out[small][b] and out[small][b][m] > 0
                }
        out["large_over_small_per_mac"] = growth
    return out


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
            "compile": cfg.compile,
            "device": cfg.device,
            "device_name": torch.cuda.get_device_name() if cfg.device == "cuda" else None,
            # the fixed-point model's requantization epilogues (qatkit.epilogue): each entry
            # selects its own path, whatever QATKIT_KERNELS says
            "qatkit_kernels": {"qatkit_fixedpoint_forward": "reference",
                               "qatkit_fixedpoint_forward_compiled": "compiled"
                               if cfg.compile else None},
            "pt2e_available": pt2e_flow.available(),
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
    report.update(headline(report))
    if "speed" in report and "models" in report:
        report["cost_per_mac"] = cost_per_mac(report)
    report["meta"]["loadavg_1min_end"] = _loadavg()
    report["meta"]["total_s"] = _round(time.perf_counter() - t0)
    return report
