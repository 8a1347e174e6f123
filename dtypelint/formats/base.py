"""What every format shares: the context a renderer gets, which report it shows after ``--fix``, and the
printable copy that the formats people read render."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from dtypelint.diagnostics import FORWARD_ERROR_CODE, MIXED_INPUT_CODE, ROOT_LOCATION, group_findings
from dtypelint.escape import map_text, printable
from dtypelint.report import wrap_text

if TYPE_CHECKING:
    from dtypelint.diagnostics import Finding
    from dtypelint.plan import FixResult
    from dtypelint.report import Report
    from dtypelint.rules.base import Rule


@dataclass(frozen=True)
class FormatContext:
    """What a renderer may need besides the report. ``path``: the audited checkpoint directory or config
    file. ``rules``: the rules that could have reported (default: ``dtypelint.rules.all_rules()``, the
    generic rules and every shipped pack). ``fix``: what ``--fix`` did."""

    path: str | Path | None = None
    rules: Sequence[Rule] | None = None
    fix: FixResult | None = None

    def rule_list(self) -> list[Rule]:
        from dtypelint.rules import all_rules

        rules = list(self.rules) if self.rules is not None else all_rules()
        unique: dict[str, Rule] = {}
        for rule in rules:
            unique.setdefault(rule.code, rule)
        return list(unique.values())

    def rule_names(self) -> dict[str, str]:
        return {rule.code: rule.name for rule in self.rule_list()}


Renderer = Callable[["Report", FormatContext], str]


def audited(report: Report, context: FormatContext) -> Report:
    """The report whose findings a format lists. After ``--fix`` that is the audit the fix started from,
    in every format: the fix section (``dtypelint.formats.fix``) then says what was cast and what the
    re-audit found. Without a fix, ``report``."""
    if context.fix is not None and context.fix.before is not None:
        return context.fix.before
    return report


def grouped(report: Report) -> Report:
    """The report as the formats people read list it: one line per cause. The forward's error at the op
    where DT101 found the mix of dtypes joins that DT101 line; findings that differ only in layer indices
    (``diagnostics.group_findings``) are one, located at their pattern with their count,
    ``model.layers.{0..79}.self_attn (80x)``. Counts, next steps and data formats keep every finding."""
    shown = [group.finding if group.count == 1 else
             replace(group.finding, location=f"{group.finding.location or ROOT_LOCATION} ({group.count}x)")
             for group in group_findings(_raised_where_mixed(report.findings))]
    return replace(report, findings=shown)


def _raised_where_mixed(findings: list[Finding]) -> list[Finding]:
    """DT001 at the op DT101 names is one cause: its exception ends the DT101 line, which keeps its advice."""
    mixed = {finding.node for finding in findings if finding.code == MIXED_INPUT_CODE and finding.node}
    raised = {finding.node: finding for finding in findings
              if finding.code == FORWARD_ERROR_CODE and finding.node in mixed}
    kept = []
    for finding in findings:
        if finding.code == FORWARD_ERROR_CODE and finding.node in raised:
            continue
        if finding.code == MIXED_INPUT_CODE and finding.node in raised:
            error = raised[finding.node].message.split(" (at ", 1)[0].removeprefix("forward raised ")
            finding = replace(finding, message=f"{finding.message}; the forward raised here "
                                               f"({FORWARD_ERROR_CODE}): {error}")
        kept.append(finding)
    return kept


def notes(report: Report, width: int | None = None) -> list[str]:
    """The report's notes and what the loader built, as the text formats list them; with ``width``, the
    status line wraps to fit it (between names, never inside one)."""
    loaded = report.loaded_line()
    if loaded and width:
        loaded = wrap_text(loaded, width, subsequent_indent="  ")
    return [f"note: {note}" for note in report.notes] + ([loaded] if loaded else [])


def for_people(renderer: Renderer) -> Renderer:
    """A format people read: it renders a copy of the report, path and fix in which every text from the
    model is printable (``dtypelint.escape.printable``), so that no name or message moves the terminal's
    cursor, sets its title, reorders a line or breaks a table row. Data formats (json, sarif) keep the
    texts, which their own escaping carries exactly."""

    def render_printable(report: Report, context: FormatContext) -> str:
        return renderer(map_text(report, printable), map_text(context, printable))

    return render_printable
