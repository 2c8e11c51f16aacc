"""The ``qatkit`` command: demo, marches, doctor, report, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from qatkit.errors import QatkitError

# subcommand -> (module with add_arguments/run_cli, help)
COMMANDS = {
    "demo": ("qatkit.demo", "run the whole workflow on real data and print the accuracies"),
    "marches": ("qatkit.cli", "list marches, processors and capabilities"),
    "doctor": ("qatkit.doctor", "check a model for quantization misuses"),
    "report": ("qatkit.report", "write the per-layer accuracy report (HTML + JSON)"),
    "bench": ("qatkit.bench_cli", "benchmarks against torch.ao (needs the repository's bench/)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:  # for `qatkit marches`
    p.add_argument("--json", action="store_true")


def run_cli(args: argparse.Namespace) -> int:  # `qatkit marches`
    from qatkit.march import MARCHES
    rows = [{"march": m.name, "processors": list(m.processors),
             "activation_dtypes": list(m.activation_dtypes),
             "weight_dtypes": list(m.weight_dtypes),
             "high_precision_output": m.high_precision_output, "pow2_scales": m.pow2_scales,
             "max_rank": m.max_rank, "unsupported_ops": sorted(m.unsupported_ops),
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


class _Parser(argparse.ArgumentParser):
    """Usage errors: one line on stderr and exit code 2, never a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="qatkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError:
            p.set_defaults(unavailable=module)
    args = parser.parse_args(argv)
    module = COMMANDS[args.command][0]
    if getattr(args, "unavailable", None):
        print(f"qatkit {args.command}: not available in this installation", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(module).run_cli(args) or 0)
    except QatkitError as e:
        print(f"qatkit {args.command}: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"qatkit {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
