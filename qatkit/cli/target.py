"""What the subcommands share: loading ``FILE.py:FUNC``, parsing shapes, one-line usage errors.

Nothing here imports torch: ``qatkit --help`` and argument errors answer at once.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import Any


class UsageError(Exception):
    """A mistake in the command line: exit status 2 with a one-line message."""


def parse_shape(text: str) -> list[tuple[int, ...]]:
    """``"1,3,32,32"`` (or ``1x3x32x32``; several inputs separated by ``;``) -> shapes."""
    shapes = []
    for part in text.replace(" ", "").split(";"):
        if not re.fullmatch(r"\d+([,x]\d+)*", part):
            raise UsageError(f"bad --input-shape {text!r}: expected integers like 1,3,32,32")
        dims = tuple(int(d) for d in re.split(r"[,x]", part))
        if any(d <= 0 for d in dims):
            raise UsageError(f"bad --input-shape {text!r}: every size must be positive")
        shapes.append(dims)
    return shapes


def load_target(target: str) -> Any:
    """Import FILE.py from its path and return FUNC (UsageError on any problem)."""
    path, sep, func = target.rpartition(":")
    if not sep or not path or not func:
        raise UsageError(f"expected FILE.py:FUNC, got {target!r}")
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    path = os.path.abspath(path)
    name = "_qatkit_target_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    sys.path.insert(0, os.path.dirname(path))  # so FILE.py can import its neighbours
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        raise UsageError(f"cannot import {path}: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(os.path.dirname(path))
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise UsageError(f"{os.path.basename(path)} has no function {func!r}")
    return fn


def int_at_least(lo: int) -> Any:
    """An argparse ``type``: an integer ``>= lo`` (else argparse's one-line usage error)."""
    import argparse

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float ``> 0``."""
    import argparse
    import math
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
