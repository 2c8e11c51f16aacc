"""Atomic file writes: a reader (or a run interrupted at any moment) sees either the old
complete file or the new complete file, never a half-written one.

The data go to a temporary file in the target's directory (same file system, so the final
``os.replace`` is an atomic rename), are flushed and fsync'ed, then renamed over the target.
On any exception, Ctrl-C included, the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from qatkit.base.errors import fail


def output_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be written as a file (None when it can): checked before a long run
    so that its result is not lost at the end."""
    p = os.fspath(path)
    if not p:
        return "the output path is empty"
    if os.path.isdir(p):
        return f"{p} is a directory; give a file name"
    parent = os.path.dirname(os.path.abspath(p))
    existing = parent
    while not os.path.exists(existing):  # directories the write would create
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK) or (
            os.path.exists(p) and not os.access(p, os.W_OK)):
        return f"{p} is not writable"
    return None


def check_output(path: str | os.PathLike) -> None:
    """Raise QK000 if ``path`` cannot be written (see :func:`output_problem`)."""
    problem = output_problem(path)
    if problem is not None:
        raise fail("QK000", f"cannot write {os.fspath(path)}: {problem}.",
                   "choose a writable file path")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = None
                ) -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, made atomic: the file appears complete at the end of
    the ``with`` block, or not at all (the old file survives)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    check_output(path)
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else (encoding or "utf-8")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):  # keep the target's permissions, not mkstemp's 0600
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself durable where the OS allows
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)
