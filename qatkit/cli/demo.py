"""``qatkit demo``: the whole workflow on bundled real data, with each stage's accuracy."""

from __future__ import annotations

import argparse
import json
import os

from qatkit.cli.target import UsageError, int_at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=("digits", "fashion"), default="digits")
    p.add_argument("--march", default="nash-e", help="march or processor (see qatkit marches)")
    p.add_argument("--epochs", type=int_at_least(1), default=None,
                   help="float epochs (digits 15, fashion 3)")
    p.add_argument("--qat-epochs", type=int_at_least(0), default=None,
                   help="QAT epochs (digits 3, fashion 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", metavar="DIR", help="write float/calibrated/qat/quantized .pt")
    p.add_argument("--consistency-level", type=int, choices=(0, 1, 2), default=0,
                   help="nash-e/nash-m: 1 = power-of-two activation scales, 2 = and weights")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (and nothing else: no progress bars)")
    p.add_argument("--threads", type=int_at_least(1), default=None, metavar="N",
                   help="torch.set_num_threads(N), in every --nproc worker too (default: "
                        "torch's default; with --nproc, the cores shared out)")
    p.add_argument("--nproc", type=int_at_least(1), default=1,
                   help="calibrate and train QAT in N local processes (gloo)")


def run(args: argparse.Namespace) -> int:
    if args.save:  # checked before the long run, not after it
        problem = _save_dir_problem(args.save)
        if problem:
            raise UsageError(f"--save: {problem}")
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    from qatkit.demo.recipe import print_table
    from qatkit.demo.recipe import run as run_demo
    if args.nproc > 1 and args.consistency_level:
        raise UsageError("--consistency-level is not available with --nproc > 1")
    if args.nproc > 1:
        from qatkit.demo.distributed import run_demo as run_demo_distributed
        result = run_demo_distributed(args)
    else:
        result = run_demo(args.dataset, args.march, args.epochs, args.qat_epochs, args.seed,
                     args.save, quiet=args.json,
                     consistency_level=args.consistency_level)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


def _save_dir_problem(d: str) -> str | None:
    if os.path.exists(d) and not os.path.isdir(d):
        return f"{d} exists and is not a directory"
    existing = os.path.abspath(d)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        return f"{d} is not writable"
    return None
