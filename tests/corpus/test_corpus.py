"""Every corpus case: the audit neither raises nor changes the model, and the expectation holds (a strict
xfail where ``known_miss`` names the mechanism dtypelint misses today)."""

from __future__ import annotations

import pytest

from .cases import CASES, Case
from .runner import run


def params(with_known_misses: bool) -> list:
    def marks(case: Case) -> list:
        if with_known_misses and case.known_miss:
            return [pytest.mark.xfail(strict=True, reason=case.known_miss)]
        return []

    return [pytest.param(case, id=case.id, marks=marks(case)) for case in CASES]


def outcome_of(case: Case):
    outcome = run(case.id)
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    return outcome


@pytest.mark.parametrize("case", params(with_known_misses=False))
def test_audit_neither_raises_nor_changes_the_model(case: Case):
    outcome = outcome_of(case)
    assert outcome.raised is None
    assert outcome.changed is None


@pytest.mark.parametrize("case", params(with_known_misses=True))
def test_expected_finding_or_clean_control(case: Case):
    outcome = outcome_of(case)
    if case.control or case.fixed_upstream:
        assert [(f.code, f.location, f.message) for f in outcome.alarms] == []
    else:
        assert outcome.hit, [(f.code, f.category, f.severity, f.location, f.tensor) for f in outcome.findings]


def test_corpus_shape():
    """Issue #12's floor: 30 reports from 8 projects, every mechanism by two reports, ids unique."""
    assert len({case.id for case in CASES}) == len(CASES)
    assert len({case.url for case in CASES}) >= 30
    assert len({case.project for case in CASES}) >= 8
    for mechanism in range(1, 8):
        assert len({case.url for case in CASES if case.mechanism == mechanism}) >= 2, mechanism
