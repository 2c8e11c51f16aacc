"""``qatkit doctor FILE.py:FUNC``: every rule on the model FUNC returns, as one report.

    qatkit doctor FILE.py:FUNC [--march M | --processor P] [--input-shape 1,3,32,32]
        [--input-source camera|other] [--format text|json|html] [--output PATH] [--strict]

Exit status: 0 no error-level finding, 1 at least one, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qatkit.cli.target import UsageError, _one_line, load_target, parse_shape


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="FILE.py:FUNC",
                        help="FUNC() returns a model, or (model, example_inputs)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--march", help="target march (nash-e, bayes, ...)")
    which.add_argument("--processor", help="target processor (J6E, J5, RDK X5, ...)")
    parser.add_argument("--input-shape", metavar="SHAPE",
                        help="random example input(s) of this shape: 1,3,32,32 "
                             "(several inputs: 1,3,32,32;1,10)")
    parser.add_argument("--input-source", choices=("camera", "other"),
                        help="camera: the model is fed centered YUV444 (QK005)")
    parser.add_argument("--format", choices=("text", "json", "html"), default="text")
    parser.add_argument("--output", metavar="PATH", help="write the report here")
    parser.add_argument("--strict", action="store_true", help="warnings count as errors")


def _build(args: argparse.Namespace) -> Any:
    import torch
    import torch.nn as nn

    from qatkit.base.errors import QatkitError
    from qatkit.base.frames import user_line_of
    from qatkit.base.march import get_march, resolve
    from qatkit.doctor.check import Report, check
    from qatkit.doctor.rules import Finding
    fn = load_target(args.target)
    march = args.march
    try:
        if march is not None or args.processor is not None:
            resolve(march, args.processor) if march else resolve(processor=args.processor)
    except QatkitError as e:
        raise UsageError(_one_line(e)) from None
    from qatkit.base.march import set_march
    setting = set_march(march, processor=args.processor) if (
        march or args.processor) else None
    try:
        try:
            out = fn()
        except QatkitError as e:  # e.g. prepare refused inside FUNC: a finding, not a usage error
            f = Finding(e.code, "error", "", f"{args.target.rpartition(':')[2]}() raised: "
                        f"{e.message}", e.fix, user_line_of(e.__traceback__))
            return Report([f], [], "unknown", get_march().name if get_march() else None,
                          args.strict, ["the model could not be built"])
        except Exception as e:
            raise UsageError(f"{args.target}() raised {type(e).__name__}: {_one_line(e)}"
                             ) from None
        model, inputs = out, None
        if isinstance(out, tuple):
            if len(out) != 2:
                raise UsageError("FUNC() must return a model or (model, example_inputs)")
            model, inputs = out
        if not isinstance(model, nn.Module):
            raise UsageError(f"FUNC() returned {type(model).__name__}, not an nn.Module (or "
                             "(model, example_inputs))")
        generated = False
        if args.input_shape:
            shapes = parse_shape(args.input_shape)
            gen = torch.Generator().manual_seed(0)
            xs = tuple(torch.randn(s, generator=gen) for s in shapes)
            inputs, generated = (xs[0] if len(xs) == 1 else xs), True
        if inputs is None:
            raise UsageError("no example inputs: FUNC returned only a model; pass "
                             "--input-shape (e.g. --input-shape 1,3,32,32)")
        report = check(model, inputs, march=march, processor=args.processor,
                       input_source=args.input_source, strict=args.strict)
        err = report.trace_error
        if generated and err is not None and not isinstance(err, QatkitError):
            raise UsageError(f"the model does not run on inputs of shape {args.input_shape}: "
                             f"{type(err).__name__}: {_one_line(err)}")
        return report
    finally:
        if setting is not None:
            setting.__exit__(None, None, None)


def run(args: argparse.Namespace) -> int:
    """``qatkit doctor``: 0 no error-level finding, 1 at least one, 2 usage error."""
    from qatkit.base.files import output_problem, write_text
    try:
        if args.input_shape:
            parse_shape(args.input_shape)  # a bad shape is reported before importing FILE
        if args.output and output_problem(args.output):
            raise UsageError(f"--output: {output_problem(args.output)}")
        report = _build(args)
        fmt = args.format
        if args.output:
            text = (report.to_json() + "\n" if fmt == "json" else
                    report.to_html() if fmt == "html" else report.to_text())
            try:
                write_text(args.output, text)  # atomic
            except OSError as e:
                raise UsageError(f"cannot write {args.output}: {e.strerror}") from None
        elif fmt == "json":
            print(report.to_json())
        elif fmt == "html":
            sys.stdout.write(report.to_html())
        else:
            from rich.console import Console
            report.print(Console(highlight=False, width=max(100, _term_width())))
        return report.exit_code
    except UsageError as e:
        print(f"qatkit doctor: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback
        print(f"qatkit doctor: internal error: {type(e).__name__}: {_one_line(e)}",
              file=sys.stderr)
        return 2


def _term_width() -> int:
    import shutil
    return shutil.get_terminal_size((120, 24)).columns


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not usage + error
        print(f"qatkit doctor: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="qatkit doctor", description="check a model for quantization "
                     "misuses")
    add_arguments(parser)
    return run(parser.parse_args(argv))

