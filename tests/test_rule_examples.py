"""Every rule's documented examples are its tests: the "Example" program gets that rule's
finding and nothing else, the "Use instead" program gets no finding at all.

The programs are the rules' ``bad`` and ``good`` strings, i.e. exactly what docs/rules/QKnnn.md
shows; each runs after ``EXAMPLE_PREAMBLE`` (shown in docs/rules/README.md) through the real
workflow and doctor. What a program gets: the QatkitError it raises (the workflow's guards stop
at the first error), the QatkitWarnings it issues and, when it assigns ``report =
qk.doctor.check(...)``, that report's findings.
"""

from __future__ import annotations

import linecache
import re
import warnings
from pathlib import Path

import pytest

import qatkit as qk
from qatkit.base import march
from qatkit.base.errors import QatkitError, QatkitWarning
from qatkit.doctor import Report
from qatkit.doctor.rules import EXAMPLE_PREAMBLE, Rule, all_rules
from qatkit.doctor.rules import qk006_qat_evaluation as qk006
from qatkit.doctor.rules.gen_docs import pages

DOCS = Path(__file__).resolve().parent.parent / "docs" / "rules"
RULES = sorted(all_rules().values(), key=lambda r: r.code)
IDS = [r.code for r in RULES]


def findings(rule: Rule, which: str) -> list[tuple[str, str, str]]:
    """(code, how, message) of everything the ``which`` ("bad"/"good") example of ``rule``
    gets, run as a program after the preamble."""
    src = EXAMPLE_PREAMBLE.lstrip("\n") + "\n\n" + getattr(rule, which).strip("\n") + "\n"
    # a user file's name: a "<...>" name counts as generated library code, whose torch calls
    # are no call sites (qatkit/base/frames.py), and the example would not run as a user's does
    name = f"{rule.code.lower()}_{which}_example.py"
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)  # readable tracebacks
    qk006.reset()  # QK006 follows models across calls: each program starts afresh
    got: list[tuple[str, str, str]] = []
    ns: dict[str, object] = {"__name__": "__example__"}
    with march.no_march(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exec(compile(src, name, "exec"), ns)
        except QatkitError as e:
            got.append((e.code, "raised", str(e)))
    got += [(w.message.code, "warned", str(w.message)) for w in caught
            if isinstance(w.message, QatkitWarning)]
    report = ns.get("report")
    if isinstance(report, Report):
        got += [(f.code, f"doctor {f.severity}", str(f)) for f in report.findings]
    return got


def _listing(got: list[tuple[str, str, str]]) -> str:
    return "\n".join(f"  {how}: {msg}" for _, how, msg in got) or "  nothing"


def test_every_rule_the_doctor_has_is_covered():
    assert {f"QK00{i}" for i in range(1, 10)} | {f"QK10{i}" for i in range(7)} <= set(IDS)


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_bad_example_gets_its_rule_and_no_other(rule: Rule):
    got = findings(rule, "bad")
    assert got, f"the {rule.code} example program gets no finding"
    assert {code for code, _, _ in got} == {rule.code}, \
        f"the {rule.code} example program gets:\n{_listing(got)}"


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_good_example_gets_no_finding(rule: Rule):
    got = findings(rule, "good")
    assert got == [], f"the {rule.code} 'use instead' program gets:\n{_listing(got)}"


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_marker_comments_name_the_rule(rule: Rule):
    """A ``# [QKnnn] ...`` comment marks where the bad example is flagged; the good one has
    none, and neither uses names the preamble does not define as placeholders (``...``)."""
    assert set(re.findall(r"\[(QK\d{3})\]", rule.bad)) == {rule.code}
    assert not re.findall(r"\[QK\d{3}\]", rule.good)
    for text in (rule.bad, rule.good):
        code_lines = [ln.split("#", 1)[0] for ln in text.splitlines()]
        assert not any(ln.strip() == "..." for ln in code_lines), "a placeholder line"


def test_the_pages_show_the_preamble_the_examples_run_after():
    readme = (DOCS / "README.md").read_text(encoding="utf-8")
    assert readme == pages()["README.md"], "out of date: run python -m qatkit.doctor.rules.gen_docs"
    assert EXAMPLE_PREAMBLE.strip() in readme
    for r in RULES:
        page = (DOCS / f"{r.code}.md").read_text(encoding="utf-8")
        assert r.bad.strip() in page and r.good.strip() in page
        assert "README.md#examples" in page


# ---- the QK004 "use instead" in the setting it describes: two torch.distributed processes --


def _codes_on_rank(rank: int, world: int, code: str, which: str) -> list[str]:
    return [c for c, _, _ in findings(all_rules()[code], which)]


@pytest.mark.slow
def test_qk004_good_example_is_clean_on_every_rank_of_a_two_process_job():
    """Every rank calibrates its shard with synchronize=True: no QK004, nothing else."""
    assert qk.distributed.spawn(_codes_on_rank, 2, "QK004", "good", threads=1) == [[], []]
