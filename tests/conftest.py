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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--sweep", action="store_true",
                     help="also run the tests marked sweep (every torchvision model)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--sweep"):
        return
    keep = [i for i in items if i.get_closest_marker("sweep") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
