"""``qatkit summary FILE.py:FUNC``: one row per quantized op of the model FUNC returns.

FUNC returns a model or ``(model, example_inputs)``. A prepared or converted model is summarized
as it is; a float model is prepared first (``--march``, default qconfig ``--qconfig qat`` or
``calibration``) to show what qatkit would quantize, and how.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="FILE.py:FUNC",
                   help="FUNC() returns a model, or (model, example_inputs)")
    p.add_argument("--march", default=None, help="march for a float model (default nash-e)")
    p.add_argument("--qconfig", choices=("qat", "calibration"), default="qat",
                   help="default qconfig to prepare a float model with")
    p.add_argument("--input-shape", metavar="SHAPE", help="random example input: 1,3,32,32")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(args: argparse.Namespace) -> int:
    from qatkit.cli.target import UsageError, _one_line, load_target, parse_shape
    try:
        shapes = parse_shape(args.input_shape) if args.input_shape else None
        fn = load_target(args.target)
        out = fn()
    except UsageError as e:
        print(f"qatkit summary: error: {e}", file=sys.stderr)
        return 2
    import torch
    import torch.nn as nn

    from qatkit.analysis.summary import summary
    from qatkit.base.march import set_march
    from qatkit.quantization import meta
    from qatkit.quantization.prepare import prepare
    from qatkit.quantization.qconfig import default_calibration_qconfig, default_qat_qconfig
    model, inputs = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not isinstance(model, nn.Module):
        print(f"qatkit summary: error: {args.target}() returned {type(model).__name__}, not "
              "an nn.Module", file=sys.stderr)
        return 2
    if shapes:
        gen = torch.Generator().manual_seed(0)
        xs = tuple(torch.randn(s, generator=gen) for s in shapes)
        inputs = xs[0] if len(xs) == 1 else xs
    if meta.get(model) is None:
        if inputs is None:
            print("qatkit summary: error: a float model needs example inputs: return "
                  "(model, example_inputs) or pass --input-shape", file=sys.stderr)
            return 2
        q = default_qat_qconfig() if args.qconfig == "qat" else default_calibration_qconfig()
        try:
            with set_march(args.march or "nash-e"):
                model = prepare(model, inputs, qconfig=q)
        except Exception as e:
            print(f"qatkit summary: error: prepare failed: {_one_line(e)}", file=sys.stderr)
            return 1
    rows = summary(model, inputs)
    if args.json:
        print(json.dumps({"stage": rows.stage, "march": rows.march, "rows": rows.to_dicts()}))
    else:
        print(rows.table())
    return 0
