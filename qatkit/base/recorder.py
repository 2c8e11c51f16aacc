"""The one recorder of model execution, and who is watching a forward pass right now.

:class:`Recorder` watches a model run: the data-flow trace (``qatkit.quantization.trace``),
the per-layer comparison and the statistics (``qatkit.analysis``) are its subclasses. A
recorder is pushed while it watches. Modules that compute in one call what the recorder
should see as one op (FloatFunctional and QFunctional methods) report themselves to
:func:`active` and run their internals inside :func:`inside_leaf`, so the ops they call are
not recorded again. Fake quants and the doctor's runtime checks ask :func:`active` so that
watching never changes the model.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

# Per thread: a trace in one thread must not make another thread's forwards "watched".
_local = threading.local()


def _stack() -> list[Any]:
    st = getattr(_local, "stack", None)
    if st is None:
        st = _local.stack = []
    return st


def push(rec: Any) -> None:
    _stack().append(rec)


def pop(rec: Any) -> None:
    st = _stack()
    if st and st[-1] is rec:
        st.pop()


def active() -> Any:
    """The innermost recorder watching a forward pass in this thread, or None."""
    st = _stack()
    return st[-1] if st else None


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


# ---- the recorder ------------------------------------------------------------------------------

@dataclass
class Call:
    """One top-level call seen by a :class:`Recorder`: a leaf module's forward, or a method of
    a module that reports itself (FloatFunctional / QFunctional: ``method`` is its name)."""

    name: str  # the module's qualified name
    index: int  # 0 for its first call in this forward of the model, 1 for the second...
    module: Any
    method: str | None
    args: tuple
    kwargs: dict[str, Any]
    output: Any = None

    @property
    def label(self) -> str:
        """``name``, or ``name#k`` for the k-th call (k >= 1)."""
        return self.name + (f"#{self.index}" if self.index else "")


_QUANT_CHILDREN = ("activation_post_process", "weight_fake_quant")


def is_leaf(module: nn.Module) -> bool:
    """A layer for recording: a module without children, or one that says it is a leaf
    (``_qatkit_leaf``: a QuantStub holds its fake quant as a child). A module whose own code
    calls operators that prepare generated (``_qatkit_path`` is set) is not: those operators
    are the layers."""
    if getattr(module, "_qatkit_leaf", False):
        return True
    return "_qatkit_path" not in module.__dict__ and next(module.children(), None) is None


class Recorder:
    """Watches ``model`` run, as a context manager: every top-level call of a leaf module (not
    the fake quants and observers inside layers, not types in ``skip_types``) and every method
    call a FloatFunctional/QFunctional reports (:meth:`functional`), in execution order.

    Subclasses implement :meth:`begin` (before a module runs: its arguments as passed) and
    :meth:`end` (after; returning a value replaces the module's output). Calls inside a
    recorded call are not recorded (``depth`` counts the nesting); call indices restart at
    every forward of the model. The recorder is :func:`active` while inside the block."""

    skip_types: tuple[type, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        self.depth = 0
        self._counts: dict[int, int] = {}
        self._open: list[Call | None] = []
        self._handles: list[Any] = []

    # -- what subclasses see ---------------------------------------------------------------------
    def begin(self, call: Call) -> None:
        """A leaf module is about to run (top level)."""

    def end(self, call: Call) -> Any:
        """A recorded call finished (``call.output`` is set); a non-None answer replaces the
        output of a module call."""
        return None

    # -- reported by modules whose methods are ops (FloatFunctional, QFunctional) ------------------
    def functional(self, module: nn.Module, method: str, args: tuple, output: Any,
                   kwargs: dict[str, Any] | None = None) -> None:
        if self.depth == 0:
            c = self._new_call(module, method, args, kwargs or {})
            c.output = output
            self.end(c)

    def torch_call(self, func: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        """A torch call on a quantized tensor that the call-site dispatcher ran itself (it
        does not reach the torch function modes below it)."""

    def is_leaf(self, module: nn.Module) -> bool:
        """Whether calls of ``module`` are recorded as one op (see :func:`is_leaf`)."""
        return is_leaf(module)

    def alias(self, obj: Any, same_as: Any) -> None:
        """An in-place op made ``obj`` hold what ``same_as`` holds (the trace follows it)."""

    # -- mechanics -------------------------------------------------------------------------------
    def _new_call(self, module: nn.Module, method: str | None, args: tuple,
                  kwargs: dict[str, Any]) -> Call:
        k = self._counts.get(id(module), 0)
        self._counts[id(module)] = k + 1
        return Call(self.names.get(id(module), "?"), k, module, method, args, kwargs)

    def _pre(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        c = None
        if self.depth == 0:
            c = self._new_call(mod, None, args, kwargs)
            self.begin(c)
        self._open.append(c)
        self.depth += 1

    def _post(self, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        self.depth -= 1
        c = self._open.pop()
        if c is None:
            return None
        c.output = out
        self.depth += 1  # what end() computes is not a recorded op
        try:
            return self.end(c)
        finally:
            self.depth -= 1

    def _model_pre(self, mod: nn.Module, args: tuple) -> None:
        if self.depth == 0:  # call indices count within one forward of the model
            self._counts = {}

    def __enter__(self) -> Recorder:
        skip = {id(m) for n, m in self.model.named_modules() if n.endswith(_QUANT_CHILDREN)}
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre))
        for n, m in self.model.named_modules():
            inside_quant = any(part in _QUANT_CHILDREN for part in n.split("."))
            if id(m) in skip or inside_quant or not self.is_leaf(m) or \
                    isinstance(m, self.skip_types):
                continue
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True))
        push(self)
        return self

    def __exit__(self, *exc: object) -> None:
        pop(self)
        for h in self._handles:
            h.remove()
        self._handles, self._open, self.depth = [], [], 0
