"""``qatkit report``: the per-layer accuracy report (HTML + JSON) of a model or of the demo.

    qatkit report --demo [--dataset digits] [--damage LAYER] --output report.html
    qatkit report FILE.py:FUNC --output report.html

Exit status: 0 written, 1 a qatkit error, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from qatkit.cli.target import UsageError, int_at_least, load_target, positive_float


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="FILE.py:FUNC",
                   help="FUNC() returns (float_model, quantized_model, example_inputs"
                        "[, (x, y)])")
    p.add_argument("--demo", action="store_true",
                   help="run the demo workflow (train, calibrate, QAT) and report on it")
    p.add_argument("--dataset", choices=("digits", "fashion"), default="digits",
                   help="demo dataset")
    p.add_argument("--damage", metavar="LAYER",
                   help="demo: multiply LAYER's output scale by --damage-factor before convert")
    p.add_argument("--damage-factor", type=positive_float, default=100.0,
                   help="demo: > 1 wastes levels (100: conv2's int8 output uses 3 levels "
                        "and the fixed-point model loses 10 points), < 1 clips")
    p.add_argument("--epochs", type=int_at_least(1), default=None, help="demo float epochs")
    p.add_argument("--qat-epochs", type=int_at_least(0), default=3, help="demo QAT epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--march", help="target march or processor (default: the model's)")
    p.add_argument("--budget", type=int_at_least(0), default=2,
                   help="layers to suggest for int16")
    p.add_argument("--samples", type=int_at_least(1), default=256,
                   help="samples in the per-layer comparison batch")
    p.add_argument("--output", "-o", default="qatkit-report.html", metavar="PATH",
                   help="HTML file to write (its data goes to PATH with .json)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 with --demo, whose tiny model only spins "
                        "on more; torch's default otherwise)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _from_target(target: str) -> dict[str, Any]:
    try:
        fn = load_target(target)
    except UsageError as e:
        raise _Usage(str(e)) from None
    try:
        out = fn()
    except Exception as e:
        from qatkit.base.errors import QatkitError
        if isinstance(e, QatkitError):
            raise
        raise _Usage(f"{target}() raised {type(e).__name__}: {e}") from None
    if not isinstance(out, tuple) or len(out) not in (3, 4):
        raise _Usage("FUNC() must return (float_model, quantized_model, example_inputs) or "
                     "(float_model, quantized_model, example_inputs, (x, y))")
    return {"float": out[0], "quant": out[1], "example_inputs": out[2], "label": None,
            "data": out[3] if len(out) == 4 else None, "monitor": None, "march": None,
            "calibration": None}


class _Usage(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    """``qatkit report``: 0 written, 1 a qatkit error (printed by the CLI), 2 usage error."""
    import torch

    from qatkit.analysis.report import write_report
    from qatkit.base.files import output_problem
    from qatkit.demo.recipe import report_models
    try:
        if args.demo == bool(args.target):
            raise _Usage("give either --demo or FILE.py:FUNC")
        if not args.demo and args.damage:
            raise _Usage("--damage applies to --demo only")
        json_out = os.path.splitext(args.output)[0] + ".json"
        for out in (args.output, json_out):  # before the long run, and DIR.json untouched
            problem = output_problem(out)
            if problem:
                raise _Usage(f"--output: {problem}")
        if os.path.abspath(json_out) == os.path.abspath(args.output):
            raise _Usage("--output must not end in .json (the JSON goes beside it)")
        threads = args.threads if args.threads is not None else (1 if args.demo else None)
        if threads is not None:
            if threads < 1:
                raise _Usage(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        t = time.perf_counter()
        if args.demo:
            m = report_models(args.dataset, args.march or "nash-e", args.epochs, args.qat_epochs,
                            args.seed, args.damage, args.damage_factor, quiet=True)
        else:
            m = _from_target(args.target)
        r = write_report(args.output, m["float"], m["quant"], m["example_inputs"], m["data"],
                         args.march or m["march"], budget=args.budget, samples=args.samples,
                         monitor=m["monitor"], calibration=m["calibration"],
                         quant_label=m["label"])
    except _Usage as e:
        print(f"qatkit report: error: {e}", file=sys.stderr)
        return 2
    seconds = round(time.perf_counter() - t, 1)
    line = {"html": args.output, "json": os.path.splitext(args.output)[0] + ".json",
            "seconds": seconds, "metrics": r["metrics"], "worst_layer": r["summary"][
                "worst_layer"], "most_sensitive": r["summary"]["most_sensitive"],
            "causes": r["summary"]["causes"],
            "int16_suggestion": (r["sensitivity"] or {}).get("suggestion"),
            "float_fallback": (r.get("all_but_one") or {}).get("fallback")}
    if args.json:
        print(json.dumps(line))
    else:
        mt = r["metrics"]

        def shown(v: Any) -> str:  # rounded for display; the JSON keeps the exact value
            if v is None:
                return "-"
            return f"{v:.2f} %" if mt.get("unit") == "%" else f"{v:.6g}"
        print(f"wrote {line['html']} and {line['json']} ({seconds} s)")
        print(f"{mt['name']}: float {shown(mt['float'])}, fake quant {shown(mt['fake_quant'])}, "
              f"fixed point {shown(mt['fixed_point'])}")
        fallback = (r.get("all_but_one") or {}).get("fallback")
        if fallback:
            print(f"keeping {', '.join(fallback)} in float: "
                  f"{shown(r['all_but_one']['steps'][-1]['metric'])} (fake quant)")
        print(f"largest own error: {line['worst_layer']}; most sensitive: "
              f"{line['most_sensitive']}")
        for layer, kind in line["causes"].items():
            print(f"degraded: {layer} ({kind})")
        if line["int16_suggestion"]:
            applied = (r["sensitivity"] or {}).get("applied")
            gain = (f" (fixed point {shown(applied['before'])} -> {shown(applied['after'])})"
                    if applied else "")
            print(f"int16 suggestion: {', '.join(line['int16_suggestion'])}{gain}")
    return 0
