"""``qatkit export FILE.py:FUNC --output model.onnx [--flavour integer|qdq]``: FUNC returns
``(quantized_model, example_inputs)``; the ONNX file is written atomically (see docs/export.md).

Exit status: 0 written, 1 qatkit refused the model, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from qatkit.cli.target import UsageError, _one_line, load_target


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="FILE.py:FUNC",
                   help="FUNC() returns (quantized_model, example_inputs)")
    p.add_argument("--output", required=True, metavar="MODEL.onnx")
    p.add_argument("--flavour", choices=("integer", "qdq"), default="integer",
                   help="integer: exact integer ops (bit-identical in onnxruntime); qdq: "
                        "QuantizeLinear/DequantizeLinear + a .encodings.json sidecar")


def load_model(target: str) -> tuple[Any, Any]:
    """Call FUNC of FILE.py: ``(model, example_inputs)`` (UsageError when it returns another
    thing)."""
    import torch.nn as nn
    out = load_target(target)()
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module)):
        raise UsageError("FUNC() must return (quantized_model, example_inputs)")
    return out


def usage(cmd: str, message: str) -> int:
    print(f"qatkit {cmd}: error: {_one_line(message)}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        return usage("export", f"no such directory: {folder}")
    try:
        model, inputs = load_model(args.target)
    except UsageError as e:
        return usage("export", str(e))
    from qatkit.export import export_onnx
    export_onnx(model, inputs, args.output, flavour=args.flavour)
    print(f"wrote {args.output} ({args.flavour})")
    return 0
