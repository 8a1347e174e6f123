"""Run one corpus case through ``dtypelint.pipeline`` and judge it against its expectation."""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from functools import cache

import torch

import dtypelint
from dtypelint.shipped import available_packs

from .cases import CASES, Case

try:
    from helpers import assert_unchanged, snapshot
except ImportError:  # run as ``python -m tests.corpus``, where ``tests`` is the package
    from tests.helpers import assert_unchanged, snapshot

ALARMS = ("error", "warning")


@dataclass
class Outcome:
    case: Case
    skipped: str | None = None
    findings: list = field(default_factory=list)
    raised: str | None = None  # the audit itself raised
    changed: str | None = None  # the audit changed the model

    @property
    def alarms(self) -> list:
        return [f for f in self.findings if f.severity in ALARMS]

    @property
    def hit(self) -> bool:
        expect = self.case.expect
        return expect is not None and any(
            f.category == expect.category
            and f.severity == expect.severity
            and all(name in f"{f.location or ''} {f.tensor or ''}" for name in expect.names)
            for f in self.findings
        )

    @property
    def passed(self) -> bool:
        """The expectation holds: the bug's finding appears, or the control (or the bug its library has since
        fixed) has no alarm."""
        return not self.alarms if self.case.control or self.case.fixed_upstream else self.hit


def skip_reason(case: Case) -> str | None:
    if case.needs_pack and case.needs_pack not in available_packs():
        return f"needs the {case.needs_pack} pack"
    if case.needs_library and not _importable(case.needs_library):
        return f"needs {case.needs_library} (pip install -e '.[{case.needs_library}]')"
    return None


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def audit_settings(case: Case) -> dict:
    """The case's audit keywords; a case that needs a pack is audited under it."""
    return {"backend": case.needs_pack, **case.audit} if case.needs_pack else dict(case.audit)


@cache
def run(case_id: str) -> Outcome:
    case = next(c for c in CASES if c.id == case_id)
    outcome = Outcome(case, skipped=skip_reason(case))
    if outcome.skipped:
        return outcome
    model, inputs = case.build()
    before = snapshot(model)
    autocast = torch.autocast("cpu", dtype=getattr(torch, case.autocast)) if case.autocast else contextlib.nullcontext()
    try:
        with autocast:
            outcome.findings = dtypelint.audit(model, inputs, **audit_settings(case)).findings
    except Exception as error:  # noqa: BLE001 - any exception is the outcome
        outcome.raised = f"{type(error).__name__}: {error}"
    try:
        assert_unchanged(model, before)
    except AssertionError as error:
        outcome.changed = str(error) or "model changed"
    return outcome
