"""``text``, ``concise`` and ``full``: the formats of a terminal.

``text`` is the findings table when it fits the terminal (``COLUMNS``), else ``concise``; then what to do
next (how many findings ``--fix`` / ``--fix --unsafe-fixes`` would fix, ``dtypelint explain``), the notes
and the summary line. ``concise`` is one line per finding, ``location: severity CODE message [fix]``.
``full`` is always the table: module and tensor names are never cut, long messages wrap. After ``--fix``
each shows the audit's findings and summary, then the fix (``formats.fix``).
"""

from __future__ import annotations

import shutil
from collections import Counter
from typing import TYPE_CHECKING

from dtypelint.diagnostics import ISLAND_CODE, ROOT_LOCATION, Applicability
from dtypelint.formats.base import FormatContext, audited, grouped, notes
from dtypelint.formats.fix import fix_text

if TYPE_CHECKING:
    from dtypelint.diagnostics import Finding
    from dtypelint.report import Report

# The narrowest a wrapped message column may get before one line per finding reads better.
MIN_MESSAGE_WIDTH = 30


def render_text(report: Report, context: FormatContext) -> str:
    """The table when it fits the terminal (``COLUMNS``), else one line per finding: names are never cut."""
    shown = audited(report, context)
    listed = grouped(shown)
    table = fitted_table(listed, terminal_width())
    return _text(shown, context, table if table is not None else concise_lines(listed))


def render_full(report: Report, context: FormatContext) -> str:
    shown = audited(report, context)
    listed = grouped(shown)
    table = fitted_table(listed, terminal_width())
    return _text(shown, context, table if table is not None else listed.table(message_width=MIN_MESSAGE_WIDTH))


def render_concise(report: Report, context: FormatContext) -> str:
    shown = audited(report, context)
    return _text(shown, context, concise_lines(grouped(shown)))


def terminal_width() -> int:
    return shutil.get_terminal_size(fallback=(120, 24)).columns


def fitted_table(report: Report, width: int) -> str | None:
    """The table with its message column wrapped to fit ``width``, or None when even a narrow message
    column leaves no room (long module and tensor names)."""
    if not report.findings:
        return ""
    narrow = report.table(message_width=MIN_MESSAGE_WIDTH)
    spare = width - max(map(len, narrow.splitlines()))
    if spare < 0:
        return None
    return report.table(message_width=MIN_MESSAGE_WIDTH + spare)


def concise_lines(report: Report) -> str:
    """``location: severity CODE message [fix]``, one finding a line."""
    return "\n".join(
        f"{finding.location or ROOT_LOCATION}: {finding.severity} {finding.code} {finding.message} "
        f"[{finding.fix.short() if finding.fix else 'no automatic fix'}]"
        for finding in report.ordered()
    )


def _text(report: Report, context: FormatContext, findings: str) -> str:
    """The findings, the notes, then what to do next (ruff's closing lines) and the summary line; after a
    fix, the summary line and the fix instead of the next steps."""
    if context.fix is not None:
        closing = [report.summary_line(), fix_text(context.fix)]
    else:
        closing = [*_next_steps(report), report.summary_line()]
    return "\n".join(part for part in (findings, *notes(report, terminal_width()), *closing) if part)


def _next_steps(report: Report) -> list[str]:
    if not report.findings:
        return []
    safe = [finding for finding in report.findings if finding.fix and finding.fix.safety == Applicability.SAFE]
    unsafe = [finding for finding in report.findings if finding.fix and finding.fix.safety == Applicability.UNSAFE]
    steps = []
    if report.mode != "value" and (safe or unsafe):
        # Fixes patch real weights and are verified by a forward: only value mode has both.
        steps.append(f"{_count(safe + unsafe)} fixable in value mode (`--mode value` on a checkpoint with its "
                     f"weights; {_WHY_NOT_FIXED.get(report.mode, report.mode + ' mode cannot fix')})")
    else:
        if safe:
            steps.append(f"{_count(safe)} fixable with `--fix`")
        if unsafe:
            steps.append(f"{_count(unsafe)} fixable with `--fix --unsafe-fixes` (it may cost precision; "
                         f"`--diff` lists the casts first)")
    if report.mode != "value" and any(finding.code == ISLAND_CODE for finding in report.findings):
        steps.append(f"`dtypelint precision PATH --dtype {report.compute_dtype}` (with the weights) finds the "
                     "fewest modules to keep in float32, verified by a forward")
    listed = grouped(report).ordered()  # the rule named is one the lines above show
    example = next((finding for finding in listed if finding.fix), listed[0])
    steps.append(f"`dtypelint explain {example.code}` explains a rule and how to fix it by hand")
    return steps


_WHY_NOT_FIXED = {"meta": "meta mode has no weights to patch", "static": "--static runs no forward to verify with"}


def _count(findings: list[Finding]) -> str:
    by_severity = Counter(finding.severity for finding in findings)
    return ", ".join(f"{count} {severity}{'s' if count != 1 else ''}" for severity, count in by_severity.items())
