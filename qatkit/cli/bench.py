"""``qatkit bench``: the benchmark suite of the repository's ``bench/`` package.

``bench/`` is not installed with the wheel; this command runs it when it is importable (the
current directory or the source checkout qatkit was installed from, editable) and otherwise
says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType


def _candidates() -> list[str]:
    # qatkit/cli/bench.py -> the directory holding the qatkit package (a source checkout)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [os.getcwd(), pkg_parent]


def available() -> bool:
    """Whether bench/ can be found (without importing it): only then is the command offered."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("bench")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and any(os.path.isfile(os.path.join(p, "suite.py"))
                                for p in spec.submodule_search_locations or []):
        return True
    return any(os.path.isfile(os.path.join(root, "bench", "suite.py")) for root in _candidates())


def _load() -> ModuleType | None:
    """``bench.__main__`` of a repository checkout, or None."""
    try:
        return importlib.import_module("bench.__main__")
    except ImportError:
        pass
    for root in _candidates():
        if os.path.isfile(os.path.join(root, "bench", "suite.py")):
            if root not in sys.path:
                sys.path.insert(0, root)
            try:
                return importlib.import_module("bench.__main__")
            except ImportError:
                continue
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of models,speed,memory,accuracy (default: all)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda: models and inputs on that device")


def run(args: argparse.Namespace) -> int:
    module = _load()
    if module is None or not hasattr(module, "run_cli"):
        print("qatkit bench: the benchmark suite (bench/) is not installed with qatkit; run "
              "this from a qatkit source checkout (the directory holding bench/), e.g. "
              "`python -m bench --json`", file=sys.stderr)
        return 2
    return int(module.run_cli(args) or 0)
