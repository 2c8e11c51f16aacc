"""Shared helpers of the bit-exactness tests (tests/test_bitexact*.py).

Every case is built through the public workflow: a tiny float ``nn.Module`` with QuantStubs, the
op(s) and a DeQuantStub; ``qk.prepare`` under a march; the activation fake quants' ``scale``
buffers set directly (``initialized``/``calibrated`` = 1); ``qk.convert``. The converted
modules are then run on :class:`~qatkit.base.qtensor.QTensor` inputs and their integers compared
with the NumPy reference (``tests/reference/npref.py``) with ``np.array_equal``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import strategies as st

import qatkit as qk
from qatkit.base.errors import QatkitError
from qatkit.base.qtensor import QTensor
from qatkit.base.quant_math import TORCH_DTYPE
from qatkit.quantization.fake_quant import fake_quants
from tests.reference import npref as R

DTYPES = ("qint8", "qint16")
# QATKIT_BITEXACT_EXAMPLES=10 runs every property test with 10x its examples (a longer hunt)
EXAMPLES_FACTOR = float(os.environ.get("QATKIT_BITEXACT_EXAMPLES", "1"))


def examples(n: int) -> int:
    """``max_examples`` for a property test: ``n`` (sized for the whole suite to run in about a
    minute on one thread) times ``QATKIT_BITEXACT_EXAMPLES``."""
    return max(1, round(n * EXAMPLES_FACTOR))

FILLS = ("random", "random", "small", "min", "max", "extremes")


def f32(v: float) -> float:
    """The float32 number nearest to ``v``, as a Python float."""
    return float(np.float32(v))


def scale_strategy(lo: float = -12.0, hi: float = 2.0) -> st.SearchStrategy[float]:
    """float32 scales ``2**u`` over several orders of magnitude, with exact powers of two
    (which make requantization ties) drawn often."""
    return st.one_of(
        st.floats(lo, hi, allow_nan=False).map(lambda e: f32(2.0**e)),
        st.integers(int(np.ceil(lo)), int(np.floor(hi))).map(lambda e: 2.0**e),
    )


scales = scale_strategy()
dtypes = st.sampled_from(DTYPES)
fills = st.sampled_from(FILLS)
# weights: "zero_channel" also zeroes output channel 0 (its scale is then the 2^-40 floor, its
# multiplier tiny: the requantization falls back from float64 to int64); "pow2": every channel's
# amax is 127.5 * 2^k, so its scale is a power of two and, with power-of-two activation scales,
# requantization meets exact ties
wfills = st.sampled_from((*FILLS, "zero_channel", "pow2", "pow2"))
seeds = st.integers(0, 2**32 - 1)


def ints(rng: np.random.Generator, shape: Sequence[int], dtype: str, fill: str) -> np.ndarray:
    """Integer test data in the range of ``dtype`` (int64)."""
    lo, hi = R.QRANGE[dtype]
    shape = tuple(shape)
    if fill == "min":
        return np.full(shape, lo, dtype=np.int64)
    if fill == "max":
        return np.full(shape, hi, dtype=np.int64)
    if fill == "extremes":
        return rng.choice(np.array([lo, hi], dtype=np.int64), size=shape)
    if fill == "small":
        return rng.integers(-3, 4, size=shape, dtype=np.int64)
    return rng.integers(lo, hi + 1, size=shape, dtype=np.int64)


def float_weights(rng: np.random.Generator, shape: Sequence[int], fill: str,
                  channel_axis: int = 0) -> np.ndarray:
    """float32 weights with a per-output-channel magnitude spanning 10^-3 .. 10.

    ``fill="extremes"``: every weight is +-amax of its channel, so the quantized weights sit at
    -128 / 127; ``"max"``/``"min"``: all +amax / all -amax."""
    shape = tuple(shape)
    bshape = [1] * len(shape)
    bshape[channel_axis] = shape[channel_axis]
    amax = (10.0 ** rng.uniform(-3, 1, size=shape[channel_axis])).reshape(bshape)
    if fill == "pow2":
        amax = 127.5 * 2.0 ** rng.integers(-14, -2, size=bshape)
        w = rng.integers(-127, 128, size=shape) / 127.5 * amax
        first: list = [0] * len(shape)  # the first weight of every channel is its amax
        first[channel_axis] = slice(None)
        w[tuple(first)] = amax.reshape(-1)
        return w.astype(np.float32)
    if fill == "extremes":
        w = rng.choice(np.array([-1.0, 1.0]), size=shape) * amax
    elif fill == "max":
        w = np.ones(shape) * amax
    elif fill == "min":
        w = -np.ones(shape) * amax
    elif fill == "small":
        w = rng.integers(-2, 3, size=shape) * amax / 2
    else:
        w = rng.uniform(-1.0, 1.0, size=shape) * amax
    if fill == "zero_channel":
        np.moveaxis(w, channel_axis, 0)[0] = 0.0
    return w.astype(np.float32)


def float_bias(rng: np.random.Generator, n: int, kind: str) -> np.ndarray | None:
    """None, an ordinary bias, or a huge one whose int32 quantization saturates."""
    if kind == "none":
        return None
    if kind == "huge":
        return (rng.choice([-1.0, 1.0], size=n) * 1e6).astype(np.float32)
    return (rng.normal(size=n) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)


def set_param(p: torch.nn.Parameter | None, value: np.ndarray | None) -> None:
    if p is None:
        assert value is None
        return
    with torch.no_grad():
        p.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def qtensor(q: np.ndarray, s: float, dtype: str) -> QTensor:
    return QTensor(torch.from_numpy(np.asarray(q, dtype=np.int64)).to(TORCH_DTYPE[dtype]),
                   torch.tensor(s, dtype=torch.float32), dtype)


def qconfig(out_dtype: str = "qint8", inputs: dict[str, str] | None = None,
            high_precision: bool = False, names: dict[str, str] | None = None
            ) -> qk.QConfigMapping:
    """Global qconfig with output dtype ``out_dtype``; ``inputs``/``names`` give other modules
    (QuantStubs, ...) their own activation dtype."""
    mapping = qk.QConfigMapping(qk.QConfig(qk.QuantSpec(out_dtype),
                                           high_precision_output=high_precision))
    for name, dt in {**(inputs or {}), **(names or {})}.items():
        mapping.set_module_name(name, qk.QConfig(qk.QuantSpec(dt),
                                                 high_precision_output=high_precision))
    return mapping


def set_scales(prepared: nn.Module, scales: dict[str, float]) -> None:
    """Put the given scale in the activation fake quant of each named module (and mark it
    initialized and calibrated)."""
    seen = set()
    for name, fq in fake_quants(prepared):
        if fq.is_weight:
            continue
        owner = name.removesuffix(".activation_post_process")
        if not fq.observer.seen:  # statistics for the convert guard (QK008); unused here
            fq.observer(torch.tensor([-1.0, 1.0]))
        fq.scale.fill_(scales[owner])
        fq.initialized.fill_(1)
        fq.calibrated.fill_(1)
        seen.add(owner)
    extra = set(scales) - seen
    assert not extra, f"no activation fake quant for {sorted(extra)}"


def build(model: nn.Module, example: Any, scales: dict[str, float],
          qconfig_: Any, march: str = "nash-e") -> tuple[nn.Module, nn.Module]:
    """prepare -> set scales -> convert; returns (prepared, converted)."""
    model.eval()
    with qk.set_march(march):
        prepared = qk.prepare(model, example, qconfig=qconfig_)
        set_scales(prepared, scales)
        converted = qk.convert(prepared)
    return prepared, converted


class Chain(nn.Module):
    """QuantStub -> ops... -> DeQuantStub (module names ``quant``, ``ops.0``, ...)."""

    def __init__(self, *ops: nn.Module) -> None:
        super().__init__()
        self.quant = qk.QuantStub()
        self.ops = nn.ModuleList(ops)
        self.dequant = qk.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        for op in self.ops:
            x = op(x)
        return self.dequant(x)


class Functional(nn.Module):
    """QuantStubs ``q.0``, ``q.1``, ... -> one FloatFunctional method ``ff`` -> DeQuantStub."""

    def __init__(self, op: str, n_in: int, *args: Any, as_list: bool = False, **kw: Any
                 ) -> None:
        super().__init__()
        self.q = nn.ModuleList(qk.QuantStub() for _ in range(n_in))
        self.ff, self.dequant = qk.FloatFunctional(), qk.DeQuantStub()
        self.op, self.args, self.kw, self.as_list = op, args, kw, as_list

    def call(self, ff: nn.Module, xs: list) -> Any:
        fn = getattr(ff, self.op)
        return fn(xs, *self.args, **self.kw) if self.as_list else fn(*xs, *self.args, **self.kw)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.call(self.ff, [q(x) for q, x in zip(self.q, xs)]))


def run_ops(converted: Chain, x: QTensor) -> QTensor:
    for op in converted.ops:
        x = op(x)
    return x


@contextmanager
def capture_dequant_input(model: nn.Module, name: str = "dequant") -> Iterator[list[Any]]:
    """Record what the DeQuantStub ``name`` receives (the integer result of the model)."""
    got: list[Any] = []
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: got.append(i[0]))
    try:
        yield got
    finally:
        h.remove()


def as_np(q: torch.Tensor) -> np.ndarray:
    return q.detach().to(torch.int64).numpy()


def assert_ints(got: QTensor, want: np.ndarray, dtype: str | None = None,
                scale: Any = None, what: str = "") -> None:
    """``got.q`` equals ``want`` element for element (and dtype / scale, when given)."""
    assert isinstance(got, QTensor), f"{what}: expected a QTensor, got {type(got)}"
    g = as_np(got.q)
    want = np.asarray(want)
    assert want.dtype == np.int64, want.dtype
    assert g.shape == want.shape, f"{what}: shape {g.shape} != reference {want.shape}"
    if not np.array_equal(g, want):
        bad = np.argwhere(g != want)
        first = [tuple(int(i) for i in b) for b in bad[:5]]
        vals = [(int(g[b]), int(want[b])) for b in first]
        raise AssertionError(f"{what}: {len(bad)} of {g.size} integers differ from the "
                             f"reference; first (index, got, want): "
                             f"{[(i, *v) for i, v in zip(first, vals)]}")
    if dtype is not None:
        assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
        assert got.q.dtype == TORCH_DTYPE[dtype], f"{what}: storage {got.q.dtype}"
        lo, hi = R.QRANGE[dtype]
        assert g.min(initial=lo) >= lo and g.max(initial=hi) <= hi
    if scale is not None:
        s = np.asarray(scale, dtype=np.float32)
        gs = got.scale.detach().numpy()
        assert gs.dtype == np.float32 and np.array_equal(gs, s), \
            f"{what}: scale {gs} != {s}"


def assert_floats(got: torch.Tensor, want: np.ndarray, what: str = "") -> None:
    """Bit-for-bit equality of float32 results."""
    g = got.detach().numpy()
    want = np.asarray(want)
    assert g.dtype == np.float32 and want.dtype == np.float32, (g.dtype, want.dtype)
    assert g.shape == want.shape, f"{what}: shape {g.shape} != {want.shape}"
    if not np.array_equal(g.view(np.int32), want.view(np.int32)):
        n = int((g.view(np.int32) != want.view(np.int32)).sum())
        raise AssertionError(f"{what}: {n} of {g.size} float32 values differ in their bits")


def weight_scales_from_range(w: np.ndarray, b: np.ndarray | None = None, channel_axis: int = 0
                             ) -> np.ndarray:
    """Per-output-channel weight scales made independently by the reference (sections 2, 5;
    an all-zero channel takes its range from its bias)."""
    return R.weight_scales(np.moveaxis(np.asarray(w, dtype=np.float32), channel_axis, 0), b)


def agree(run: Any, reference: Any) -> tuple[Any, Any]:
    """``(run(), reference())``, or ``(None, None)`` when the reference says the spec refuses
    the case (``R.Refused``): then the fixed-point model must refuse too, with QK105."""
    try:
        want = reference()
    except R.Refused:
        with pytest.raises(QatkitError) as err:
            run()
        assert err.value.code == "QK105", err.value
        return None, None
    return run(), want
