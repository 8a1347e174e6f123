"""``github``: GitHub Actions workflow commands, one line per finding:
``::error file=PATH,title=CODE NAME::LOCATION: MESSAGE`` (``::warning`` / ``::notice`` for warnings and
infos), and after ``--fix`` one ``::notice`` with the fix's outcome. Empty when there is nothing to say.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dtypelint.diagnostics import ROOT_LOCATION
from dtypelint.formats.base import FormatContext, audited, grouped
from dtypelint.formats.fix import fix_outcome

if TYPE_CHECKING:
    from dtypelint.diagnostics import Finding
    from dtypelint.report import Report

GITHUB_COMMANDS = {"error": "error", "warning": "warning", "info": "notice"}


def escape_data(text: str) -> str:
    """Escape the message of a workflow command (``%``, ``\\r``, ``\\n``)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a property value of a workflow command: as data, and ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_line(finding: Finding, *, path: str | Path | None = None, rule_name: str | None = None) -> str:
    command = GITHUB_COMMANDS[finding.severity]
    properties = []
    if path is not None:
        properties.append(f"file={escape_property(str(path))}")
    title = f"{finding.code} {rule_name or finding.category}"
    properties.append(f"title={escape_property(title)}")
    message = f"{finding.location or ROOT_LOCATION}: {finding.message}"
    return f"::{command} {','.join(properties)}::{escape_data(message)}"


def render_github(report: Report, context: FormatContext) -> str:
    names = context.rule_names()
    lines = [github_line(finding, path=context.path, rule_name=names.get(finding.code))
             for finding in grouped(audited(report, context)).ordered()]
    if context.fix is not None:  # the fix's outcome as one notice, after the findings it started from
        lines.append(f"::notice title={escape_property('dtypelint --fix')}::"
                     f"{escape_data('; '.join(fix_outcome(context.fix)))}")
    return "\n".join(lines)
