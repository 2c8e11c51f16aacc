"""The ``qatkit`` command: ``qatkit SUBCOMMAND ...`` (``qatkit --help`` lists them).

Each subcommand is one module of ``qatkit.cli`` with ``add_arguments(parser)`` (no torch
import) and ``run(args)``; only the chosen one's ``run`` imports the library.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qatkit.base import VERSION

# subcommand -> (module, help)
COMMANDS = {
    "demo": ("qatkit.cli.demo", "run the whole workflow on real data and print the accuracies"),
    "marches": ("qatkit.cli.marches", "list marches, processors and capabilities"),
    "doctor": ("qatkit.cli.doctor", "check a model for quantization misuses"),
    "report": ("qatkit.cli.report", "write the per-layer accuracy report (HTML + JSON)"),
    "export": ("qatkit.cli.export", "write the fixed-point model as ONNX (integer or qdq)"),
    "verify": ("qatkit.cli.verify", "compare an exported ONNX file with qatkit's fixed point"),
    "summary": ("qatkit.cli.summary", "one row per quantized op: kind, dtypes, scales, qconfig"),
    "bench": ("qatkit.cli.bench", "benchmarks against torch.ao (needs the repository's bench/)"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors: one line on stderr and exit code 2, never a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="qatkit", description="Float to bit-exact integer models for "
                     "BPU-style NPUs, with a doctor that catches quantization misuses.")
    parser.add_argument("--version", action="version", version=f"qatkit {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        if not getattr(mod, "available", lambda: True)():
            continue  # e.g. bench: only where the repository's bench/ is installed
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
    try:
        args = parser.parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C: the conventional 128 + SIGINT, no traceback
        print("qatkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qatkit marches --json | head -1`: the reader left; be silent
        _silence_stdout()
        return 0


def _run(args: argparse.Namespace) -> int:
    from qatkit.base.errors import QatkitError
    from qatkit.cli.target import UsageError
    try:
        code = int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers
        return code
    except QatkitError as e:
        print(f"qatkit {args.command}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except (UsageError, FileNotFoundError) as e:
        print(f"qatkit {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush raises nothing."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
