"""The recorder of model execution: who is watching a forward pass right now.

A recorder (the data-flow trace, the per-layer comparison, the statistics) is pushed while it
watches a model run. Modules that compute in one call what the recorder should see as one op
(FloatFunctional and QFunctional methods) report themselves to :func:`active` and run their
internals inside :func:`inside_leaf`, so the ops they call are not recorded again. Fake quants
and the doctor's runtime checks ask :func:`active` so that watching never changes the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_stack: list[Any] = []


def push(rec: Any) -> None:
    _stack.append(rec)


def pop(rec: Any) -> None:
    if _stack and _stack[-1] is rec:
        _stack.pop()


def active() -> Any:
    """The innermost recorder watching a forward pass, or None."""
    return _stack[-1] if _stack else None


@contextlib.contextmanager
def inside_leaf() -> Iterator[None]:
    """Ops run inside a recorded op are not recorded themselves."""
    rec = active()
    if rec is None:
        yield
        return
    rec.depth += 1
    try:
        yield
    finally:
        rec.depth -= 1
