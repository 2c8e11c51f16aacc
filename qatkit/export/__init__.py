"""ONNX export of the fixed-point model and its verification against onnxruntime.

``qk.export_onnx(quantized_model, example_inputs, path, flavour="integer")`` writes an ONNX
file whose integer-only graph computes exactly the integers of ``docs/fixed-point.md``;
``flavour="qdq"`` the standard QuantizeLinear/DequantizeLinear form plus its encodings;
:func:`qatkit.export.verify.compare` runs it in onnxruntime next to the fixed-point model.
See docs/export.md.
"""

from __future__ import annotations

import json
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


def encodings_path(path: str) -> str:
    """Where the qdq flavour's sidecar goes: ``model.onnx`` -> ``model.encodings.json``."""
    root, ext = os.path.splitext(path)
    return (root if ext == ".onnx" else path) + ".encodings.json"


def export_onnx(quantized_model: nn.Module, example_inputs: Any, path: str | None = None,
                flavour: str = "integer") -> Any:
    """Export a converted (fixed-point) model to ONNX; returns the ModelProto and writes it to
    ``path`` when given.

    ``flavour="integer"``: integer-only ops that compute exactly qatkit's integers (identical in
    onnxruntime). ``flavour="qdq"``: QuantizeLinear/DequantizeLinear around float ops (int8
    symmetric, per-channel weights on axis 0, int32 bias at ``s_in * s_w``), plus the sidecar
    ``encodings_path(path)`` with every tensor's dtype and scale (also stored in the model
    property ``qatkit.encodings``); its requantization is the runtime's. See docs/export.md."""
    require_onnx()
    from qatkit.quantization import meta
    if flavour not in FLAVOURS:
        raise fail("QK000", f"unknown ONNX flavour {flavour!r}.", "use 'integer' or 'qdq'")
    m = meta.get(quantized_model)
    if m is None or m.stage != "converted":
        raise fail("QK000", "export_onnx needs the fixed-point model.",
                   "export the result of qk.convert(model)")
    f16 = [n for n, mod in quantized_model.named_modules()
           if getattr(mod, "out_dtype", None) == "float16"]
    if f16:  # docs/fixed-point.md section 19: not yet written as ONNX ops
        raise fail("QK106", f"export_onnx: {', '.join(f16[:5])} run in float16 (nash-p/nash-h), "
                   "which the ONNX exporters do not write yet.",
                   "export a model with integer qconfigs, or deploy it with the vendor "
                   "toolchain from the QAT checkpoint")
    if flavour == "qdq":
        from qatkit.export.onnx_qdq import export_qdq
        model, enc = export_qdq(quantized_model, example_inputs)
        if path is not None:
            enc = {**enc, "march": m.march, "model": os.path.basename(path)}
            write_atomic(encodings_path(path), (json.dumps(enc, indent=1) + "\n").encode())
    else:
        from qatkit.export.onnx_integer import export_integer
        model = export_integer(quantized_model, example_inputs)
    if path is not None:
        write_atomic(path, model.SerializeToString())
    return model


__all__ = ["FLAVOURS", "encodings_path", "export_onnx", "require_onnx", "write_atomic"]
