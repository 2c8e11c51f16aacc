"""``qatkit verify MODEL.onnx FILE.py:FUNC [--checkpoint PATH] [--data inputs.pt] [--json]``:
onnxruntime vs qatkit's fixed-point model, per output and per layer (identical-element
fraction, max LSB difference, argmax agreement). FUNC returns ``(quantized_model,
example_inputs)``, or with ``--checkpoint`` the float model and example inputs (see
``qatkit export``).

Exit status: 0 done (and, for the integer flavour or a qdq file of a model converted with a
target profile, identical), 1 such a file differs in some element or qatkit refused the model,
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from qatkit.cli.export import TARGET_HELP, add_checkpoint, load_model, usage
from qatkit.cli.target import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", metavar="MODEL.onnx")
    p.add_argument("target", metavar="FILE.py:FUNC", help=TARGET_HELP)
    add_checkpoint(p)
    p.add_argument("--data", metavar="INPUTS.pt",
                   help="a tensor or tuple of tensors saved with torch.save (default: FUNC's "
                        "example inputs)")
    p.add_argument("--json", action="store_true")


def _load_data(path: str) -> Any:
    import torch
    data = torch.load(path, weights_only=True)
    return tuple(data) if isinstance(data, list) else data


def run(args: argparse.Namespace) -> int:
    for p in (args.onnx, args.data):
        if p is not None and not os.path.isfile(p):
            return usage("verify", f"no such file: {p}")
    try:
        model, inputs = load_model(args.target, args.checkpoint)
    except UsageError as e:
        return usage("verify", str(e))
    if args.data:
        try:
            inputs = _load_data(args.data)
        except Exception as e:
            return usage("verify", f"cannot read {args.data}: {type(e).__name__}: {e}")
    from qatkit.export import require_onnx
    from qatkit.export.verify import compare
    proto = require_onnx().load(args.onnx)
    props = {p.key: p.value for p in proto.metadata_props}
    flavour = props.get("qatkit.flavour", "?")
    # exact: the integer flavour, and qdq files of models converted with a target profile
    exact = flavour == "integer" or "qatkit.profile" in props
    report = compare(proto, model, inputs)
    report["flavour"] = flavour
    report["profile"] = props.get("qatkit.profile")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{args.onnx} ({flavour} flavour) vs qatkit fixed point")
        for r in report["outputs"] + report["layers"]:
            agree = "" if r["agree"] is None else f"  argmax agree {r['agree']:.2%}"
            print(f"  {r['name']:<28} identical {r['identical']:.4%}  max LSB "
                  f"{r['max_lsb']:g}{agree}")
        print("identical" if report["identical"] else "DIFFERENT" if exact else
              "differs: the qdq flavour requantizes with the runtime's arithmetic "
              "(docs/export.md)")
    return 1 if exact and not report["identical"] else 0
