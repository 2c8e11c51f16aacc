"""The rule registry: every rule documented, codes unique, docs/rules/ in sync."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from qatkit.doctor.rules import RULE_MODULES, SEVERITIES, STAGES, Rule, all_rules
from qatkit.doctor.rules.gen_docs import main as gen_docs
from qatkit.doctor.rules.gen_docs import pages

DOCS = Path(__file__).resolve().parent.parent / "docs" / "rules"
RULES = sorted(all_rules().values(), key=lambda r: r.code)


def test_the_nine_misuses_are_registered():
    assert {f"QK00{i}" for i in range(1, 10)} <= set(all_rules())


def test_codes_are_unique_and_match_their_module():
    codes = []
    for name in RULE_MODULES:
        try:
            mod = importlib.import_module(f"qatkit.doctor.rules.{name}")
        except ModuleNotFoundError:
            continue  # listed ahead of its implementation
        assert isinstance(mod.RULE, Rule)
        assert name.startswith(mod.RULE.code.lower() + "_"), (name, mod.RULE.code)
        codes.append(mod.RULE.code)
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize("rule", RULES, ids=[r.code for r in RULES])
def test_rule_is_documented(rule: Rule):
    for field in ("name", "summary", "why", "bad", "good", "fix"):
        assert getattr(rule, field).strip(), f"{rule.code}.{field} is empty"
    assert rule.severity in SEVERITIES
    assert rule.stages and set(rule.stages) <= set(STAGES)
    assert callable(rule.check)


@pytest.mark.parametrize("rule", RULES, ids=[r.code for r in RULES])
def test_docs_page_is_generated_from_the_rule(rule: Rule):
    page = DOCS / f"{rule.code}.md"
    assert page.is_file(), "run: python -m qatkit.doctor.rules.gen_docs"
    assert page.read_text(encoding="utf-8") == rule.docs(), \
        "out of date: run python -m qatkit.doctor.rules.gen_docs"


def test_gen_docs_check_mode(tmp_path, capsys):
    assert gen_docs(["--out", str(tmp_path), "--check"]) == 1
    assert gen_docs(["--out", str(tmp_path)]) == 0
    assert gen_docs(["--out", str(tmp_path), "--check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(pages())
