"""``qatkit export FILE.py:FUNC --output model.onnx [--flavour integer|qdq] [--checkpoint
PATH]``: FUNC returns ``(quantized_model, example_inputs)``, or with ``--checkpoint`` ``(float
model or a function building it, example_inputs)`` and the fixed-point model is rebuilt from
the checkpoint (``qk.load_quantized``); the ONNX file is written atomically (docs/export.md).

Exit status: 0 written, 1 qatkit refused the model, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from qatkit.cli.target import UsageError, _one_line, load_target

TARGET_HELP = ("FUNC() returns (quantized_model, example_inputs); with --checkpoint "
               "(float_model, example_inputs)")


def add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="PATH",
                   help="a fixed-point checkpoint (qk.checkpoint.save of the converted "
                        "model): FUNC then returns the float model (or a function making it) "
                        "and example inputs, and the fixed-point model is rebuilt with "
                        "qk.load_quantized")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="FILE.py:FUNC", help=TARGET_HELP)
    p.add_argument("--output", required=True, metavar="MODEL.onnx")
    add_checkpoint(p)
    p.add_argument("--flavour", choices=("integer", "qdq"), default="integer",
                   help="integer: exact integer ops (bit-identical in onnxruntime); qdq: "
                        "QuantizeLinear/DequantizeLinear + a .encodings.json sidecar")


def load_model(target: str, checkpoint: str | None = None) -> tuple[Any, Any]:
    """Call FUNC of FILE.py: ``(model, example_inputs)`` (UsageError when it returns another
    thing). With ``checkpoint``, FUNC gives the float model (an instance, or a function making
    one) and the fixed-point model saved in ``checkpoint`` is rebuilt from it."""
    import torch.nn as nn
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UsageError(f"no such file: {checkpoint}")
    out = load_target(target)()
    want = "(float_model, example_inputs)" if checkpoint else "(quantized_model, example_inputs)"
    if not (isinstance(out, tuple) and len(out) == 2):
        raise UsageError(f"FUNC() must return {want}")
    model, inputs = out
    if checkpoint is not None and not isinstance(model, nn.Module) and callable(model):
        model = model()
    if not isinstance(model, nn.Module):
        raise UsageError(f"FUNC() must return {want}")
    if checkpoint is None:
        return model, inputs
    from qatkit.quantization import meta
    m = meta.get(model)
    if m is not None:
        raise UsageError(f"with --checkpoint, FUNC() must return the float model; it returned a "
                         f"{m.stage} one")
    from qatkit.quantization.rebuild import load_quantized
    return load_quantized(model, checkpoint, inputs), inputs


def usage(cmd: str, message: str) -> int:
    print(f"qatkit {cmd}: error: {_one_line(message)}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        return usage("export", f"no such directory: {folder}")
    try:
        model, inputs = load_model(args.target, args.checkpoint)
    except UsageError as e:
        return usage("export", str(e))
    from qatkit.export import export_onnx
    export_onnx(model, inputs, args.output, flavour=args.flavour)
    print(f"wrote {args.output} ({args.flavour})")
    return 0
