"""The doctor on misuses as users really make them (tests/doctor_cases): every misuse is
caught under its own code; every correct program meets no error and no warning."""

from __future__ import annotations

import pytest

import qatkit as qk
from tests.doctor_cases import CASES, good, observe, qk001_to_qk003, qk004_to_qk006, qk007_to_qk009  # noqa: F401

PARAMS = [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else [])
          for c in CASES]


@pytest.mark.parametrize("c", PARAMS)
def test_case(c):
    seen = observe(c.fn)
    if c.expect is None:
        assert seen.codes == [], seen.messages
    else:
        assert c.expect in seen.codes, (seen.codes, seen.messages)


def test_the_corpus_is_complete():
    """At least five variants of each of the nine misuses, fifteen correct programs."""
    for code in (f"QK00{i}" for i in range(1, 10)):
        variants = [c for c in CASES if c.expect == code]
        assert len(variants) >= 5, code
    assert len([c for c in CASES if c.expect is None]) >= 15
    assert qk.get_march() is None  # no case leaks a march into the process
