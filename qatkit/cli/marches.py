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
             "high_precision_output": m.high_precision_output,
             "high_precision_dtypes": list(m.high_precision_outputs),
             "consistency_levels": list(m.consistency_levels), "pow2_scales": m.pow2_scales,
             "max_rank": m.max_rank, "unsupported_ops": sorted(unsupported_ops(m)),
             "notes": m.notes} for m in MARCHES.values()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from qatkit.base.table import render
    cells = [[r["march"], ", ".join(r["processors"]), " ".join(r["activation_dtypes"]),
              " ".join(r["weight_dtypes"]), " ".join(r["high_precision_dtypes"]),
              ", ".join(map(str, r["consistency_levels"])), "yes" if r["pow2_scales"] else "",
              str(r["max_rank"] or ""), " ".join(r["unsupported_ops"])] for r in rows]
    # short headers and one space between columns: nine columns fit 80 with whole words
    print(render(("march", "processors", "acts", "weights", "hp out", "levels", "pow2", "rank",
                  "unsupported ops"), cells, title="marches (acts: activation dtypes; levels: "
                 "consistency levels)", gap=1))
    return 0
