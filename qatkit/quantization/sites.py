"""Where a torch call in ``forward`` comes from: its call site.

A call site is the pair (owner, code path). The owner is the innermost module whose own code
makes the call: a method of it, or a helper function it calls. The code path is the chain of
user frames from the owner's frame down to the call, each as qualified function name, line and
bytecode offset, so two calls on one line (``a + b + c``) are two sites, and the same line
reached from two owners (densenet's ``torch.cat`` in every dense layer) is one site per owner.
The occurrence (a loop, a block called twice in one forward) is counted by the caller.

Frames are read upwards from the call. A frame of torch's or qatkit's own files is skipped,
unless it runs a method of a module: then the call is inside that module's implementation (a
conv's ``F.conv2d``, a fake quant, a hook run by ``Module.__call__``) and is no call site.
"""

from __future__ import annotations

import dis
import sys
from types import CodeType, FrameType

import torch.nn as nn

from qatkit.base.frames import is_library_file, module_of
from qatkit.quantization.registry import BY_FUNCTION

# names of the torch functions and tensor methods that can be a call site's operator
ROUTABLE = frozenset(BY_FUNCTION)

_library: dict[CodeType, bool] = {}
_labels: dict[tuple[tuple[CodeType, int, int], ...], tuple[str, bool]] = {}
_BINARY_OP = dis.opmap.get("BINARY_OP", -1)


def _is_library(code: CodeType) -> bool:
    hit = _library.get(code)
    if hit is None:
        hit = _library[code] = is_library_file(code.co_filename)
    return hit


def _where(code: CodeType, at: int) -> str:
    """``qualname:line:col-end_line:end_col`` of the expression running at offset ``at``: the
    source span, not the offset, because the interpreter may run one call from either of two
    instructions (a specialised PRECALL or the CALL) that share it."""
    line, end_line, col, end_col = list(code.co_positions())[at // 2]
    return f"{code.co_qualname}:{line}:{col}-{end_line}:{end_col}"


def site_of(depth: int = 1) -> tuple[nn.Module, str, bool] | None:
    """``(owner, code path, augmented)`` of the torch call being handled ``depth`` frames up
    from the caller, or None when it is made inside a module's implementation or outside any
    module. ``augmented``: the call is an augmented assignment (``x += y``), whose result
    Python binds to the name, unlike ``x.add_(y)``, which must change ``x`` itself."""
    f: FrameType | None = sys._getframe(depth + 1)
    chain: list[tuple[CodeType, int, int]] = []
    while f is not None:
        code = f.f_code
        owner = module_of(f)
        if _is_library(code):
            if owner is not None:
                return None
        else:
            chain.append((code, f.f_lineno, f.f_lasti))
            if owner is not None:
                key = tuple(reversed(chain))
                label = _labels.get(key)
                if label is None:
                    inner, _, at = chain[0]
                    label = _labels[key] = (">".join(_where(c, i) for c, _, i in key),
                                            inner.co_code[at] == _BINARY_OP)
                return owner, *label
        f = f.f_back
    return None


__all__ = ["ROUTABLE", "site_of"]
