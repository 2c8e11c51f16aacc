"""ONNX export of the fixed-point model and its verification against onnxruntime.

``qk.export_onnx(quantized_model, example_inputs, path, flavour="integer")`` writes an ONNX
file whose integer-only graph computes exactly the integers of ``docs/fixed-point.md``;
:func:`qatkit.export.verify.compare` runs it in onnxruntime next to the fixed-point model.
See docs/export.md.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch.nn as nn

from qatkit.base.errors import fail

FLAVOURS = ("integer", "qdq")


def require_onnx() -> Any:
    """Import onnx, or say how to install it."""
    try:
        import onnx
    except ModuleNotFoundError:
        raise fail("QK000", "ONNX export needs the 'onnx' package, which is not installed.",
                   'pip install "qatkit[export]" (or: pip install onnx onnxruntime)') from None
    return onnx


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync'd and
    renamed over ``path``: a reader never sees a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".qatkit-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_onnx(quantized_model: nn.Module, example_inputs: Any, path: str | None = None,
                flavour: str = "integer") -> Any:
    """Export a converted (fixed-point) model to ONNX; returns the ModelProto and writes it to
    ``path`` when given. ``flavour``: ``"integer"`` (exact integer ops, bit-identical in
    onnxruntime). The ``"qdq"`` flavour is not available yet and is refused."""
    require_onnx()
    from qatkit.quantization import meta
    if flavour not in FLAVOURS:
        raise fail("QK000", f"unknown ONNX flavour {flavour!r}.", "use 'integer' or 'qdq'")
    m = meta.get(quantized_model)
    if m is None or m.stage != "converted":
        raise fail("QK000", "export_onnx needs the fixed-point model.",
                   "export the result of qk.convert(model)")
    if flavour == "qdq":
        raise fail("QK106", "the 'qdq' ONNX flavour is not implemented yet.",
                   "use flavour='integer' (exact in onnxruntime)")
    from qatkit.export.onnx_integer import export_integer
    model = export_integer(quantized_model, example_inputs)
    if path is not None:
        write_atomic(path, model.SerializeToString())
    return model


__all__ = ["FLAVOURS", "export_onnx", "require_onnx", "write_atomic"]
