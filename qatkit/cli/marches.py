"""``qatkit marches``: every march, the processors that use it and what it can run."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from qatkit.base.march import MARCHES
    from qatkit.quantization.registry import unsupported_ops
    rows = [{"march": m.name, "processors": list(m.processors),
             "activation_dtypes": list(m.activation_dtypes),
             "weight_dtypes": list(m.weight_dtypes),
             "high_precision_output": m.high_precision_output, "pow2_scales": m.pow2_scales,
             "max_rank": m.max_rank, "unsupported_ops": sorted(unsupported_ops(m)),
             "notes": m.notes} for m in MARCHES.values()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table
    t = Table(title="marches")
    for col in ("march", "processors", "activations", "hp output", "pow2", "rank",
                "unsupported ops"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["march"], ", ".join(r["processors"]), ", ".join(r["activation_dtypes"]),
                  r["high_precision_output"], "yes" if r["pow2_scales"] else "",
                  str(r["max_rank"] or ""), ", ".join(r["unsupported_ops"]))
    Console(width=160).print(t)
    return 0
