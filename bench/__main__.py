"""``python -m bench [--json] [--quick] [--threads N] [--sections a,b]`` (also ``qatkit bench``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from .suite import SECTIONS, Config, run


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        rows: list[tuple[str, Any]] = []
        for k, v in obj.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    return [(prefix, obj)]


def _print_text(report: dict[str, Any]) -> None:
    for key, value in _flatten(report):
        if isinstance(value, float):
            value = f"{value:.4g}"
        print(f"{key}: {value}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda: models and inputs on that device; CPU-only peers "
        "(torch.ao int8, pt2e x86) and the memory/accuracy sections are left out on cuda",
    )
    parser.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run the bench for parsed arguments; usage errors print one line and return 2."""
    if args.threads < 1:
        print("bench: error: --threads must be >= 1", file=sys.stderr)
        return 2
    device = getattr(args, "device", "cpu")
    if device not in ("cpu", "cuda"):
        print(f"bench: error: --device must be cpu or cuda, not {device!r}", file=sys.stderr)
        return 2
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    cfg = Config.quick_config(args.threads) if args.quick else Config.full(args.threads)
    if device == "cuda":
        cfg = dataclasses.replace(cfg, device="cuda", sections=("models", "speed"))
    if args.sections:
        wanted = tuple(s.strip() for s in args.sections.split(",") if s.strip())
        unknown = [s for s in wanted if s not in SECTIONS]
        if unknown:
            print(f"bench: error: unknown section(s) {unknown}; choose from {list(SECTIONS)}",
                  file=sys.stderr)
            return 2
        cfg = dataclasses.replace(cfg, sections=wanted)
    report = run(cfg)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        _print_text(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
