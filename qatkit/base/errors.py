"""Errors, warnings, strict mode and per-module silencing.

Every qatkit message starts with a rule code in brackets (``[QK007] ...``) so that users can
grep logs and CI configs for it. ``QK000`` is a plain usage error (a wrong argument) that is not
one of the doctor's rules.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch.nn as nn


class QatkitError(RuntimeError):
    """A mistake that would make the result wrong. ``.code`` is the rule code."""

    def __init__(self, code: str, message: str, fix: str = "") -> None:
        self.code, self.message, self.fix = code, message, fix
        super().__init__(f"[{code}] {message}" + (f" Fix: {fix}" if fix else ""))


class QatkitWarning(UserWarning):
    """A likely mistake that needs the user's judgement. ``.code`` is the rule code."""

    def __init__(self, code: str, message: str, fix: str = "") -> None:
        self.code, self.message, self.fix = code, message, fix
        super().__init__(f"[{code}] {message}" + (f" Fix: {fix}" if fix else ""))


_strict = False
# What guards silenced in this process: (code, module name, reason). The doctor reports them.
silenced_log: list[tuple[str, str, str]] = []


def set_strict(on: bool = True) -> None:
    """In strict mode every qatkit warning is raised as a :class:`QatkitError`."""
    global _strict
    _strict = on


def is_strict() -> bool:
    return _strict


@contextlib.contextmanager
def strict(on: bool = True) -> Iterator[None]:
    """Context manager form of :func:`set_strict`."""
    old = _strict
    set_strict(on)
    try:
        yield
    finally:
        set_strict(old)


def silence(module: nn.Module, code: str, reason: str) -> nn.Module:
    """Silence rule ``code`` for ``module`` (and its copies made by prepare/convert), like a
    ``noqa`` comment. A reason is required; reports still list the silenced finding."""
    if not reason or not reason.strip():
        raise QatkitError("QK000", f"silence({code!r}) needs a reason.",
                          "say why the finding does not apply, e.g. reason='shared on purpose'")
    table = dict(getattr(module, "_qatkit_silenced", {}))
    table[code] = reason
    module._qatkit_silenced = table
    return module


def silenced_codes(module: nn.Module | None) -> dict[str, str]:
    """Rule code -> reason for every rule silenced on ``module``."""
    return dict(getattr(module, "_qatkit_silenced", {})) if module is not None else {}


def silenced_reason(module: nn.Module | None, code: str) -> str | None:
    """Why ``module`` silenced rule ``code`` (None when it did not)."""
    return silenced_codes(module).get(code)


def warn(code: str, message: str, fix: str = "", module: nn.Module | None = None,
         name: str = "", stacklevel: int = 3) -> None:
    """Warn (or raise in strict mode) unless ``module`` silenced ``code``."""
    reason = silenced_reason(module, code)
    if reason is not None:
        silenced_log.append((code, name, reason))
        return
    if _strict:
        raise QatkitError(code, message, fix)
    warnings.warn(QatkitWarning(code, message, fix), stacklevel=stacklevel)


def fail(code: str, message: str, fix: str = "") -> QatkitError:
    """Build the error to raise: ``raise fail(...)`` keeps tracebacks short and readable."""
    return QatkitError(code, message, fix)
