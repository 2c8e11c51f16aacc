"""``qatkit doctor FILE.py:FUNC``: every rule on the model FUNC returns, as one report.

    qatkit doctor FILE.py:FUNC [--march M | --processor P] [--input-shape 1,3,32,32]
        [--input-source camera|other] [--history FILE.json|FILE.csv]
        [--format text|json|html] [--output PATH] [--strict]

FUNC() returns a model, ``(model, example_inputs)``, ``(model, example_inputs,
calibration_batches)`` or a dict with ``model`` and any of ``example_inputs``,
``calibration`` (a batch or a list of batches, as fed to the model: QK005 judges the first
ones) and ``history`` (per-epoch metrics, QK009). Findings the workflow raises or warns inside
FUNC (``QatkitError``, ``QatkitWarning``) are part of the report, as is a march FUNC sets
itself that differs from ``--march``/``--processor`` (QK002).

Exit status: 0 no error-level finding (warnings too with ``--strict``), 1 at least one,
2 usage error.
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
    parser.add_argument("--history", metavar="FILE",
                        help="the float training history (QK009): JSON (dict of per-epoch "
                             "lists, or a list of per-epoch dicts) or CSV (one row per epoch)")
    parser.add_argument("--format", choices=("text", "json", "html"), default="text")
    parser.add_argument("--output", metavar="PATH", help="write the report here")
    parser.add_argument("--strict", action="store_true", help="warnings count as errors")


def read_history(path: str) -> Any:
    """A training history file: JSON (dict of lists or list of dicts) or CSV (a header row,
    then one row per epoch; empty cells are left out)."""
    import csv
    import json
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if path.lower().endswith(".csv"):
                rows = [{k: v for k, v in row.items() if k and v not in (None, "")}
                        for row in csv.DictReader(fh)]
                if not rows:
                    raise UsageError(f"--history {path}: no rows under the header")
                return rows
            return json.load(fh)
    except OSError as e:
        raise UsageError(f"cannot read --history {path}: {e.strerror}") from None
    except (ValueError, csv.Error) as e:
        raise UsageError(f"--history {path} is not valid JSON/CSV: {_one_line(e)}") from None


def _unpack(out: Any) -> tuple[Any, Any, Any, Any]:
    """(model, example_inputs, calibration, history) from what FUNC returned."""
    if isinstance(out, dict):
        unknown = set(out) - {"model", "example_inputs", "inputs", "calibration", "history"}
        if "model" not in out or unknown:
            raise UsageError("FUNC() returned a dict: it needs 'model' and may have "
                             "'example_inputs', 'calibration', 'history'"
                             + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
        return (out["model"], out.get("example_inputs", out.get("inputs")),
                out.get("calibration"), out.get("history"))
    if isinstance(out, tuple):
        if len(out) not in (2, 3):
            raise UsageError("FUNC() must return a model, (model, example_inputs) or (model, "
                             "example_inputs, calibration_batches)")
        return out[0], out[1], out[2] if len(out) == 3 else None, None
    return out, None, None, None


def _calibration_inputs(batches: Any) -> Any:
    """The first calibration batches as one input (tensors concatenated along the batch)."""
    import torch
    if batches is None or isinstance(batches, torch.Tensor):
        return batches
    if isinstance(batches, (list, tuple)) and batches:
        first = [b[0] if isinstance(b, (list, tuple)) and b and isinstance(
            b[0], torch.Tensor) and len(b) == 2 else b for b in batches[:4]]  # (x, y) pairs
        if all(isinstance(b, torch.Tensor) for b in first):
            try:
                return torch.cat(first)
            except RuntimeError:
                return first[0]
        return first[0]
    return None


def _build(args: argparse.Namespace) -> Any:
    import warnings

    import torch
    import torch.nn as nn

    from qatkit.base.errors import QatkitError, QatkitWarning
    from qatkit.base.frames import user_line_of
    from qatkit.base.march import get_march, resolve
    from qatkit.doctor.check import Report, check
    from qatkit.doctor.rules import Finding
    history = read_history(args.history) if args.history else None
    fn = load_target(args.target)
    func = args.target.rpartition(':')[2]
    march = args.march
    target = None
    try:
        if march is not None or args.processor is not None:
            target = resolve(march, args.processor) if march else resolve(
                processor=args.processor)
    except QatkitError as e:
        raise UsageError(_one_line(e)) from None
    from qatkit.base.march import set_march
    setting = set_march(march, processor=args.processor) if (
        march or args.processor) else None
    raised: list[Finding] = []  # what the workflow said inside FUNC
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", QatkitWarning)
            try:
                out = fn()
            except QatkitError as e:  # e.g. prepare refused inside FUNC: a finding
                f = Finding(e.code, "error", "", f"{func}() raised: {e.message}", e.fix,
                            user_line_of(e.__traceback__))
                return Report([f, *_warned(caught, func)], [], "unknown",
                              get_march().name if get_march() else None, args.strict,
                              ["the model could not be built"])
            except Exception as e:
                raise UsageError(f"{args.target}() raised {type(e).__name__}: {_one_line(e)}"
                                 ) from None
        raised += _warned(caught, func)
        for w in caught:  # other warnings are the user's: hand them on
            if not isinstance(w.message, QatkitWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        now = get_march()
        if target is not None and now is not None and now.name != target.name:
            want = f"processor {args.processor} (march {target.name})" if args.processor \
                else f"march {target.name}"
            raised.append(Finding(
                "QK002", "error", "", f"{func}() sets march {now.name!r} itself, but the "
                f"target given to the doctor is {want}: the model is prepared for another "
                "chip than the one it will be deployed on.",
                f"remove the qk.set_march call from {func}() (or set the target's march: "
                f"qk.set_march({target.name!r}))"))
        model, inputs, calibration, returned_history = _unpack(out)
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
                       input_source=args.input_source, strict=args.strict,
                       history=history if history is not None else returned_history,
                       calibration_inputs=_calibration_inputs(calibration))
        err = report.trace_error
        if generated and err is not None and not isinstance(err, QatkitError):
            raise UsageError(f"the model does not run on inputs of shape {args.input_shape}: "
                             f"{type(err).__name__}: {_one_line(err)}")
        if raised:  # what the doctor found again itself is listed once
            extra = [r for r in raised if not any(
                f.code == r.code and (f"module '{f.module}'" in r.message or not f.module)
                for f in report.findings)]
            report.findings[:0] = extra
            order = {"error": 0, "warning": 1, "info": 2}
            report.findings.sort(key=lambda f: (order.get(f.severity, 3), f.code))
        return report
    finally:
        if setting is not None:
            setting.__exit__(None, None, None)


def _warned(caught: list, func: str) -> list[Any]:
    """QatkitWarnings issued inside FUNC, as findings."""
    from qatkit.base.errors import QatkitWarning
    from qatkit.doctor.rules import Finding
    out = []
    for w in caught:
        m = w.message
        if isinstance(m, QatkitWarning):
            out.append(Finding(m.code, "warning", "", f"{func}() warned: {m.message}", m.fix,
                               f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}"))
    return out


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
            report.print(Console(highlight=False, width=_term_width()))
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

