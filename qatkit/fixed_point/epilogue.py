"""Fused kernels of the fixed-point model (requantization epilogues, the im2col prologue), and
the switch between two paths.

The integer results are specified once (``docs/fixed-point.md`` sections 4, 6 and 12); this
module evaluates the two hottest ones either

* ``"reference"``: plain PyTorch ops, one full-tensor pass per step (float64 buffers updated in
  place, the conv epilogue a few samples at a time so the scratch stays small), or
* ``"compiled"``: the same expression compiled by ``torch.compile`` (Inductor) into one pass that
  reads the int32/int8 operands and writes the int8/int16 result, without float64 temporaries.

Both give the same integers, bit for bit: every step is an exact float64 operation (products of
integers below 2^46 with multipliers ``m * 2^-n``, sums of such multiples of ``2^-n`` below
2^53, multiplication by ``2^-8``, ``floor``, a clamp, a cast of an integer-valued float), so no
reordering or contraction into fused multiply-adds a compiler may do can change a bit.
The im2col prologue only moves int8 values (zero padding included), so it is exact on any
path. ``tests/test_epilogue.py`` checks the two paths against each other.

Choice of path: ``set_kernels("reference" | "compiled" | "auto")`` or the environment variable
``QATKIT_KERNELS``. ``"reference"`` is the default: compiling costs 15-90 s on the first call of
a converted model (one kernel per epilogue and per conv geometry), which every short run would
pay. ``"compiled"`` opts in (measured faster on large models, bench/RESULTS.md) and raises if
the compiler fails; ``"auto"`` compiles where Inductor can (a C++ compiler for CPU, Triton on
CUDA) and falls back to ``"reference"`` where ``torch.compile`` is unavailable or fails.
Shapes are symbolic, so other batch sizes and layers reuse a compiled kernel. Under
``torch.export`` every mode takes the reference path (the exported graph holds plain ops).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from qatkit.base.errors import fail

KERNEL_MODES = ("reference", "compiled", "auto")
DEFAULT_KERNELS = "reference"
_broken: set[str] = set()  # compiled kernels that failed to compile here (fell back)


def _checked(mode: str, where: str) -> str:
    if mode not in KERNEL_MODES:
        raise fail("QK000", f"unknown kernel mode {mode!r} ({where}).",
                   f"use one of {', '.join(KERNEL_MODES)}")
    return mode


def set_kernels(mode: str) -> None:
    """Select the epilogue path process-wide: ``"reference"`` (the default), ``"compiled"`` or
    ``"auto"``."""
    global _mode
    _mode = _checked(mode, "set_kernels")


_mode = _checked(os.environ.get("QATKIT_KERNELS", DEFAULT_KERNELS), "QATKIT_KERNELS")


def get_kernels() -> str:
    return _mode


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    """``with kernels("reference"): ...`` runs a block on one path, then restores the mode."""
    old = _mode
    set_kernels(mode)
    try:
        yield
    finally:
        set_kernels(old)


@functools.cache
def compile_available() -> bool:
    """Whether torch.compile (Inductor) can generate code here: a C++ compiler for CPU."""
    try:
        import torch._inductor.config  # noqa: F401
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception:
        return False
    return True


def use_compiled(x: torch.Tensor) -> bool:
    """The compiled path for a kernel input ``x`` under the current mode."""
    if _mode == "reference" or torch.compiler.is_exporting():
        return False
    if x.device.type == "cpu":  # "compiled" without a compiler: torch.compile's error
        return compile_available() or _mode == "compiled"
    return x.device.type == "cuda"  # Triton; other devices take the reference path


def _compiled(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` compiled on first use (symbolic shapes); falls back to ``fn`` for good if the
    compiler fails on this machine (``"compiled"`` mode re-raises instead). Past Dynamo's
    recompile limit (many dtype/rank combinations) a call runs ``fn`` eagerly: the same
    integers, only slower."""
    box: dict[str, Any] = {}

    def call(*args: Any) -> torch.Tensor:
        if name in _broken:
            return fn(*args)
        if "f" not in box:
            box["f"] = torch.compile(fn, dynamic=True)
        try:
            return box["f"](*args)
        except Exception as e:
            if _mode == "compiled":
                raise
            _broken.add(name)
            warnings.warn(f"qatkit: compiled {name} epilogue unavailable ({type(e).__name__}); "
                          "using the reference path", RuntimeWarning, stacklevel=2)
            return fn(*args)

    return call


# ----------------------------------------------------------------------------- conv / linear


def _conv_expr(acc: torch.Tensor, mult: torch.Tensor, addend: torch.Tensor, lo: int, hi: int,
               out_dtype: torch.dtype) -> torch.Tensor:
    # floor(acc * mult + addend): spec section 12; exact in float64 under requant_plan's bound
    t = acc.to(torch.float64) * mult + addend
    return torch.floor(t).clamp(lo, hi).to(out_dtype)


_conv_compiled = _compiled("conv", _conv_expr)


def conv_requant(acc: torch.Tensor, mult: torch.Tensor, addend: torch.Tensor, lo: int, hi: int,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """Compiled ``sat(floor(acc * mult + addend))`` (``mult``/``addend`` broadcast along the
    channel axis); the output keeps ``acc``'s memory layout (NHWC after an im2col conv)."""
    return _conv_compiled(acc, mult, addend, lo, hi, out_dtype)


# ----------------------------------------------------------------------------- add / sub


def _add_expr(qa: torch.Tensor, ma: torch.Tensor, qb: torch.Tensor, mb: torch.Tensor,
              sign: int, lo: int, hi: int, out_dtype: torch.dtype) -> torch.Tensor:
    # spec section 6 in float64 (section 12): each operand to s_o / 256 with its own rounding,
    # combined (sign 1: add, -1: sub), then * 2^-8 with one more rounding
    a = torch.floor(qa.to(torch.float64) * ma + 0.5)
    b = torch.floor(qb.to(torch.float64) * mb + 0.5)
    return torch.floor((a + b * sign) * 2.0**-8 + 0.5).clamp(lo, hi).to(out_dtype)


_add_compiled = _compiled("add", _add_expr)


def add_requant(qa: torch.Tensor, ma: torch.Tensor, qb: torch.Tensor, mb: torch.Tensor,
                sign: int, lo: int, hi: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Compiled section-6 add (``sign`` 1) or sub (-1) of two quantized operands with float64
    multipliers ``ma``/``mb`` (``m * 2^-n``, broadcast like the operands), saturated to
    ``[lo, hi]`` (a fused ReLU raises ``lo`` to 0)."""
    return _add_compiled(qa, ma, qb, mb, sign, lo, hi, out_dtype)


# ----------------------------------------------------------------------------- im2col


def _im2col_expr(x: torch.Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
                 dh: int, dw: int) -> torch.Tensor:
    # NHWC int8 -> [N*Ho*Wo, kh*kw*C] in (kh, kw, C) order (dilation 1); compiled, the padding
    # becomes a masked load and the windows one gather: one pass instead of pad + copy
    x = F.pad(x, (0, 0, pw, pw, ph, ph))
    cols = x.unfold(1, kh, sh).unfold(2, kw, sw)  # [N, Ho, Wo, C, kh, kw]
    n, ho, wo, c = cols.shape[:4]
    return cols.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * c)


_im2col_kernels: dict[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]] = {}


def im2col(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Compiled im2col of an NHWC int8 tensor (see :func:`qatkit.fixed_point.conv2d`). The
    geometry is baked into each kernel as constants (one kernel per geometry; the tensor
    shapes stay symbolic): with symbolic strides and strided slices, torch 2.13's compiled
    kernel returned a wrong shape, so this uses ``unfold`` and dilation 1 only."""
    key = (*kernel, *stride, *padding, *dilation)
    fn = _im2col_kernels.get(key)
    if fn is None:
        def geometry(x: torch.Tensor, key: tuple[int, ...] = key) -> torch.Tensor:
            return _im2col_expr(x, *key)
        fn = _im2col_kernels[key] = _compiled(f"im2col{key}", geometry)
    return fn(x)
