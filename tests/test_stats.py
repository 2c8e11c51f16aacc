"""Per-layer statistics on real data (qatkit.analysis.stats)."""

import json

import pytest
import torch

import qatkit as qk
from qatkit.analysis.stats import layer_stats

from ._diagnosis import labelled, stages


def _batches(x, n=150):
    return [x[i:i + n] for i in range(0, len(x), n)]


def test_prequant_statistics_of_a_calibrated_model():
    _, calib, _ = stages()
    x, _ = labelled()
    s = layer_stats(calib, _batches(x))
    assert s.stage == "fake quant" and s.batches == 3 and s.samples == len(x)
    names = [ls.name for ls in s.layers]
    assert names[:5] == ["quant", "conv1", "conv2", "conv3", "skip"]
    quant = s.layer("quant")
    assert quant.source == "pre-quant" and quant.count == x.numel()
    assert quant.min == pytest.approx(float(x.min())) and quant.max == pytest.approx(
        float(x.max()))
    assert quant.mean == pytest.approx(float(x.mean()), abs=1e-5)
    assert quant.std == pytest.approx(float(x.std(unbiased=False)), rel=1e-4)
    assert quant.scale == pytest.approx(float(calib.quant.activation_post_process.scale))
    conv1 = s.layer("conv1")
    assert conv1.min >= 0.0  # the fused ReLU comes before the output fake quant
    assert conv1.dtype == "qint8" and 0 <= conv1.clipped < 0.01
    assert 0.5 < conv1.range_use < 2.0  # a calibrated scale fits the data
    assert s.layer("conv3").clipped is None  # accumulator: nothing is clipped
    assert s.layer("pool").clipped is None and s.layer("pool").scale == s.layer("skip").scale
    assert all(ls.nan == 0 and ls.inf == 0 for ls in s.layers)
    json.dumps(s.to_dict(), allow_nan=False)
    # the same batches in one go give the same statistics
    one = layer_stats(calib, x)
    assert one.layer("conv2").count == s.layer("conv2").count
    assert one.layer("conv2").max == pytest.approx(s.layer("conv2").max)


def test_bad_scales_show_as_clipping_or_wasted_range():
    x, _ = labelled(200)
    _, big, big_fixed = stages("conv2", 20.0)
    _, small, small_fixed = stages("conv2", 1 / 20)
    wide = layer_stats(big, x).layer("conv2")
    assert wide.range_use < 1 / 8 and wide.clipped == 0.0
    narrow = layer_stats(small, x).layer("conv2")
    assert narrow.range_use > 8 and narrow.clipped > 0.2
    fixed = layer_stats(small_fixed, x).layer("conv2")  # integers at qmax: saturated
    assert fixed.source == "integer" and fixed.clipped == pytest.approx(narrow.clipped,
                                                                        rel=0.05)
    assert layer_stats(big_fixed, x).layer("conv2").range_use < 1 / 8


def test_nan_and_inf_are_counted_apart():
    float_model, _, _ = stages()
    x, _ = labelled(16)
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[2, 0, 0, 0] = float("-inf")
    s = layer_stats(float_model, x)
    q = s.layer("quant")
    assert (q.nan, q.inf) == (1, 2)
    assert q.count == x.numel() - 3 and torch.isfinite(torch.tensor(q.mean))
    assert q.scale is None and q.clipped is None  # a float model has no scales


def test_no_batches_is_an_error():
    _, calib, _ = stages()
    with pytest.raises(qk.QatkitError, match="no batches"):
        layer_stats(calib, [])
