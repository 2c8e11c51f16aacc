"""Realistic misuse and correct programs, in the styles users write them (torch.ao eager,
qatkit, torchvision models, nested submodules, helper methods, loops, multi-process jobs).

Each case is a function registered with :func:`case`: it runs the user's program and may
return a doctor :class:`~qatkit.doctor.check.Report`. :func:`observe` collects every code the
program meets: raised (QatkitError), warned (QatkitWarning) and in the returned report. A
misuse must be caught under its own code; a correct program must meet no error and no
warning. The one parametrised test is ``tests/test_doctor_cases.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from qatkit.base.errors import QatkitError, QatkitWarning


@dataclass
class Case:
    name: str
    expect: str | None  # the rule code that must be met; None: a correct program
    style: str
    fn: Callable[[], object]
    slow: bool = False


@dataclass
class Observed:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def codes(self) -> list[str]:
        return self.errors + self.warnings


CASES: list[Case] = []


def case(expect: str | None, style: str, slow: bool = False) -> Callable:
    def register(fn: Callable[[], object]) -> Callable[[], object]:
        CASES.append(Case(f"{expect or 'good'}-{fn.__name__}", expect, style, fn, slow))
        return fn
    return register


def observe(fn: Callable[[], object]) -> Observed:
    from qatkit.doctor.check import Report
    from qatkit.doctor.rules.qk006_qat_evaluation import reset
    seen = Observed()
    reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn()
        except QatkitError as e:
            seen.errors.append(e.code)
            seen.messages.append(str(e))
            out = None
    for w in caught:
        if isinstance(w.message, QatkitWarning):
            seen.warnings.append(w.message.code)
            seen.messages.append(str(w.message))
    if isinstance(out, Report):
        for f in out.findings:
            (seen.errors if f.severity == "error" else seen.warnings).append(f.code)
            seen.messages.append(str(f))
    return seen
