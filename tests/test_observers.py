"""The nested-grid histogram of the MSE/percentile observers: exactly the histogram a single pass
over all data on the final grid gives (NumPy), whatever the batch order and split."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qatkit.quantization.observers import HIST_BINS, MSEObserver


def _numpy_hist(data: np.ndarray, exp: int) -> np.ndarray:
    a = np.abs(data[np.isfinite(data)].astype(np.float64)) * 2.0 ** (11 - exp)
    return np.bincount(np.floor(a).astype(np.int64), minlength=HIST_BINS)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_batches=st.integers(1, 4),
       scales=st.lists(st.sampled_from([2.0**-30, 1e-3, 1.0, 3.0, 2.0**20]), min_size=4,
                       max_size=4), edges=st.booleans(), nonfinite=st.booleans())
def test_histogram_is_exact_and_order_independent(seed: int, n_batches: int, scales: list,
                                                  edges: bool, nonfinite: bool) -> None:
    rng = np.random.default_rng(seed)
    batches = [(rng.standard_normal(int(rng.integers(1, 300))) * scales[i]).astype(np.float32)
               for i in range(n_batches)]
    if edges:  # values exactly on bin edges and at powers of two
        batches[0][:3] = np.float32([2.0, 0.5, 2.0**-3 * 5])
    if nonfinite:
        batches[-1][0] = np.float32("inf")
    fwd, rev = MSEObserver(), MSEObserver()
    for b in batches:
        fwd(torch.from_numpy(b))
    for b in reversed(batches):
        rev(torch.from_numpy(b))
    assert int(fwd.hist_exp) == int(rev.hist_exp)
    assert torch.equal(fwd.hist, rev.hist)
    want = _numpy_hist(np.concatenate(batches), int(fwd.hist_exp))
    assert np.array_equal(fwd.hist.numpy(), want)
    assert int(fwd.nonfinite) == int(nonfinite)
