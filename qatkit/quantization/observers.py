"""Observers: statistics of a tensor from which a clipping threshold ``amax`` is derived.

All observers are symmetric (the threshold is a magnitude). Weights are observed per output
channel (``ch_axis=0``), activations per tensor. The scale itself is made from ``amax`` in one
place, :func:`qatkit.base.quant_math.scale_from_amax`.

Every observer keeps ``min_val``/``max_val`` (persistent, so calibration checkpoints load into
QAT models whatever observers each uses) and counts non-finite values it was shown.

The histogram observers use a *fixed, nested* grid: 2048 bins of ``|x|`` over ``[0, 2^e)``.
When data exceeds the range, ``e`` grows and pairs of bins merge exactly, so the final histogram
is the one a single pass over all data on the final grid would give, whatever the batch order
or split across processes. Percentile and MSE thresholds are pure functions of it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qatkit.base.quant_math import qrange

HIST_BINS = 2048
_EMPTY_EXP = -126  # grid exponent before any non-zero data


class Observer(nn.Module):
    """Base: tracks min/max (per channel along ``ch_axis`` or per tensor)."""

    #: True when the result depends on the order of batches (refused in synchronized calibration)
    order_dependent = False
    # Python mirror of ``count > 0`` that only ever claims True when it holds (counts only
    # grow; loading a checkpoint re-reads it): :attr:`seen` right after a forward reads no
    # buffer, so a compiled QAT step that observes and then makes its scale does not break.
    _has_data = False

    def __init__(self, ch_axis: int | None = None, dtype: str = "qint8") -> None:
        super().__init__()
        self.ch_axis, self.dtype = ch_axis, dtype
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.int64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))  # values seen

    @property
    def seen(self) -> bool:
        if not self._has_data:
            self._has_data = bool(self.count > 0)
        return self._has_data

    def _aminmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ch_axis is None:
            return torch.aminmax(x)
        flat = x.transpose(0, self.ch_axis).reshape(x.shape[self.ch_axis], -1)
        return torch.aminmax(flat, dim=1)

    def _batch_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach()
        if torch.compiler.is_compiling():
            # No data-dependent branch in a graph: count and zero the non-finite values
            # unconditionally (one fused pass). Eager skips that pass when the batch's min and
            # max are finite; both add the same count and return the same range.
            bad = ~torch.isfinite(x)
            self.nonfinite += bad.sum()
            return self._aminmax(torch.where(bad, 0.0, x))
        lo, hi = self._aminmax(x)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            bad = ~torch.isfinite(x)
            self.nonfinite += bad.sum()
            x = torch.where(bad, torch.zeros((), dtype=x.dtype), x)
            return self._batch_minmax(x)
        return lo, hi

    def _size_like(self, lo: torch.Tensor) -> None:
        if self.min_val.shape != lo.shape:  # first per-channel batch sizes the buffers
            self.min_val = torch.full_like(lo, float("inf"))
            self.max_val = torch.full_like(lo, float("-inf"))

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self._size_like(lo)
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)

    def forward(self, x: torch.Tensor) -> None:
        if x.numel() == 0:  # an empty batch (e.g. an uneven shard's split) adds nothing
            return
        lo, hi = self._batch_minmax(x)
        self._merge(lo, hi)
        self.count += x.numel()
        self._has_data = True

    def amax(self) -> torch.Tensor:
        return torch.maximum(self.min_val.abs(), self.max_val.abs()).nan_to_num(0.0, 0.0, 0.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Per-channel buffers are sized by the first batch; a checkpoint sizes them too.
        for name in ("min_val", "max_val"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._has_data = bool(self.count > 0)


class MinMaxObserver(Observer):
    """Running min and max over all data: ``amax = max(|min|, |max|)``."""


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min/max (constant 0.01; 0 freezes the range
    after the first batch). Depends on batch order."""

    order_dependent = True

    def __init__(self, ch_axis: int | None = None, dtype: str = "qint8",
                 averaging_constant: float = 0.01) -> None:
        super().__init__(ch_axis, dtype)
        self.averaging_constant = averaging_constant

    def forward(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = self._batch_minmax(x)
        self._size_like(lo)
        # The first batch merges into the empty range, later ones move it; selected on the
        # tensor ``count == 0`` rather than a Python branch, so a compiled QAT step that is
        # still collecting holds no graph break. Each result is that of the op it selects.
        first, c = self.count == 0, self.averaging_constant
        self.min_val.copy_(torch.where(first, torch.minimum(self.min_val, lo),
                                       torch.lerp(self.min_val, lo, c)))
        self.max_val.copy_(torch.where(first, torch.maximum(self.max_val, hi),
                                       torch.lerp(self.max_val, hi, c)))
        self.count += x.numel()
        self._has_data = True


class HistogramObserver(Observer):
    """Histogram of ``|x|`` on a fixed nested grid (see module docstring)."""

    def __init__(self, ch_axis: int | None = None, dtype: str = "qint8") -> None:
        if ch_axis is not None:
            raise ValueError("histogram observers are per tensor (use them for activations)")
        super().__init__(None, dtype)
        self.register_buffer("hist", torch.zeros(HIST_BINS, dtype=torch.int64), persistent=False)
        self.register_buffer("hist_exp", torch.tensor(_EMPTY_EXP), persistent=False)

    def bin_width(self) -> float:
        return 2.0 ** (int(self.hist_exp) - 11)

    def grow_to(self, exp: int) -> None:
        """Coarsen the grid to ``[0, 2^exp)`` by summing runs of ``2^d`` bins (exact)."""
        d = exp - int(self.hist_exp)
        if d <= 0:
            return
        if d >= 11:
            total = self.hist.sum()
            self.hist.zero_()
            self.hist[0] = total
        else:
            merged = self.hist.view(-1, 2**d).sum(1)
            self.hist.zero_()
            self.hist[: merged.numel()] = merged
        self.hist_exp.fill_(exp)

    def forward(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = self._batch_minmax(x)
        self._merge(lo, hi)
        self.count += x.numel()
        self._has_data = True
        a = x.detach().reshape(-1)
        if self.nonfinite > 0:
            a = a[torch.isfinite(a)]
        peak = float(torch.maximum(lo.abs(), hi.abs()))
        if peak > 0:
            self.grow_to(int(torch.frexp(torch.tensor(peak, dtype=torch.float32))[1]))
        if peak == 0:  # all zeros (or nothing finite): everything is in bin 0
            self.hist[0] += a.numel()
            return
        self._add_to_bins(a, 2.0 ** (11 - int(self.hist_exp)))

    def _add_to_bins(self, a: torch.Tensor, factor: float) -> None:
        """Count ``trunc(|a| * factor)`` into the bins. ``a * factor`` is exact (a power of two;
        float64 for tiny ranges, where the float32 product could overflow), so bin membership
        does not depend on the batch order; ``|a| < 2^e`` makes every index < 2048 (a larger
        one would fail loudly: ``index_add_`` checks its indices). One float32 buffer, updated
        in place, int32 indices, and an integer ``index_add_`` (exact in any order, and
        several times faster than ``bincount`` over int64 indices)."""
        t = a.to(torch.float64) if factor > 2.0**100 else a
        t = torch.mul(t, factor).abs_()
        idx = t.to(torch.int32)
        del t
        ones = torch.ones((), dtype=torch.int64, device=idx.device).expand(idx.numel())
        self.hist.index_add_(0, idx, ones)

    def amax(self) -> torch.Tensor:
        raise NotImplementedError


class PercentileObserver(HistogramObserver):
    """Clip at the upper edge of the first bin where the cumulative share of ``|x|`` reaches
    ``percentile`` (default 99.99)."""

    def __init__(self, ch_axis: int | None = None, dtype: str = "qint8",
                 percentile: float = 99.99) -> None:
        super().__init__(ch_axis, dtype)
        self.percentile = percentile

    def amax(self) -> torch.Tensor:
        total = int(self.hist.sum())
        if total == 0:
            return torch.tensor(0.0)
        need = self.percentile / 100.0 * total
        j = int(torch.searchsorted(torch.cumsum(self.hist.cpu(), 0).to(torch.float64),
                                   torch.tensor([need], dtype=torch.float64))[0])
        edge = min(j + 1, HIST_BINS) * self.bin_width()
        return torch.tensor(min(edge, float(super(HistogramObserver, self).amax())),
                            dtype=torch.float32)


class MSEObserver(HistogramObserver):
    """Clip at the bin edge that minimises the expected squared quantization error:
    rounding noise ``s^2 / 12`` inside the range plus ``(|x| - qmax * s)^2`` beyond it."""

    def amax(self) -> torch.Tensor:
        total = int(self.hist.sum())
        if total == 0:
            return torch.tensor(0.0)
        qmin, qmax = qrange(self.dtype)
        w = self.bin_width()
        counts = self.hist.to("cpu", torch.float64)  # 2048 numbers: the search runs on the CPU
        centers = (torch.arange(HIST_BINS, dtype=torch.float64) + 0.5) * w
        used = int(torch.nonzero(counts).max()) + 1
        cand = torch.arange(max(1, used // 8), used + 1, dtype=torch.float64) * w
        s = cand / ((qmax - qmin) / 2)
        clip = (centers[None, :used] - qmax * s[:, None]).clamp_min(0.0)
        err = (clip**2 + (s[:, None] ** 2) / 12.0 * (clip == 0)) @ counts[:used]
        best = float(cand[int(torch.argmin(err))])
        return torch.tensor(min(best, float(super(HistogramObserver, self).amax())),
                            dtype=torch.float32)


class FixedScaleObserver(Observer):
    """A fixed scale (e.g. 1/128 for centered YUV444 camera input); data is only counted."""

    def __init__(self, ch_axis: int | None = None, dtype: str = "qint8",
                 scale: float = 1.0 / 128) -> None:
        super().__init__(ch_axis, dtype)
        self.fixed_scale = float(scale)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "fixed": FixedScaleObserver,
}
