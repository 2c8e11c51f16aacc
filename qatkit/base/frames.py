"""Which stack frame is the user's: the one place that tells qatkit's and torch's files apart.

Messages name the user's ``file:line`` (a call site in a model's ``forward``, the line that
called ``prepare``). A frame belongs to the library when its file lies inside the qatkit or torch
package directory; the directory is compared with a trailing separator, so a sibling package
such as ``site-packages/torchvision`` counts as user code (its file and line are named).
"""

from __future__ import annotations

import os
import sys
import traceback
from types import FrameType, TracebackType

import torch

_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (
    os.path.dirname(os.path.abspath(__file__)),  # qatkit/base -> qatkit
    torch.__file__,
))


def is_library_file(filename: str) -> bool:
    """True for qatkit's and torch's own files and for generated code (``<string>``...)."""
    return "<" in filename or os.path.abspath(filename).startswith(_LIBRARY_DIRS)


def user_frame(depth: int = 1) -> FrameType | None:
    """The innermost caller frame (starting ``depth`` frames up) outside qatkit and torch."""
    f: FrameType | None = sys._getframe(depth + 1)
    while f is not None and is_library_file(f.f_code.co_filename):
        f = f.f_back
    return f


def user_stacklevel(level: int) -> int:
    """A ``stacklevel`` pointing at the user's line, for a warning whose ``stacklevel=level``
    would point at the caller of this function."""
    f: FrameType | None = sys._getframe(1)
    while f is not None and is_library_file(f.f_code.co_filename):
        f, level = f.f_back, level + 1
    return level


def module_of(frame: FrameType) -> torch.nn.Module | None:
    """The module whose method ``frame`` runs (its first argument, whatever its name), or
    None."""
    code = frame.f_code
    if code.co_argcount:
        first = frame.f_locals.get(code.co_varnames[0])
        if isinstance(first, torch.nn.Module):
            return first
    return None


def where(frame: FrameType | None) -> str:
    """``file.py:line`` of ``frame`` ("" for None)."""
    if frame is None:
        return ""
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def user_line_of(tb: TracebackType | None) -> str:
    """``file.py:line`` of the innermost user frame of a traceback ("" when none)."""
    found = ""
    for fr in traceback.extract_tb(tb):
        if not is_library_file(fr.filename):
            found = f"{os.path.basename(fr.filename)}:{fr.lineno}"
    return found
