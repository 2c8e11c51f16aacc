import os

# The suite runs the fixed-point epilogues on the plain reference path (the default; compiling
# costs seconds per kernel) unless QATKIT_KERNELS asks otherwise; tests/test_epilogue.py checks
# the compiled path against it. Child processes (multi-process tests, CLI runs) inherit it.
os.environ.setdefault("QATKIT_KERNELS", "reference")

import pytest
import torch

import qatkit as qk
from qatkit.base import march


@pytest.fixture(autouse=True)
def _one_thread_and_clean_march():
    """Stable timings on a shared machine, and no march leaking between tests."""
    torch.set_num_threads(1)
    with march.no_march():
        yield
    qk.set_strict(False)


@pytest.fixture(scope="session")
def digits():
    from qatkit.demo.data import load_digits
    return load_digits(seed=0)
