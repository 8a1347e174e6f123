"""The rule catalog: ``dtypelint rules`` as a terminal table, and as the Markdown table of the README."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from dtypelint.formats.markdown import md_cell

if TYPE_CHECKING:
    from dtypelint.rules.base import Rule

RULE_COLUMNS = ("code", "name", "pack", "severity", "fix", "enabled", "what it does")


def rule_rows(rules: Iterable[Rule], enabled: Callable[[Rule], bool] = lambda rule: True) -> list[tuple[str, ...]]:
    """One row per rule: identity, where it comes from, whether it can fix and whether it runs."""
    return [
        (rule.code, rule.name, rule.pack or "generic", rule.severity, rule.fix_availability,
         "yes" if enabled(rule) else "no", rule.summary)
        for rule in rules
    ]


def render_rules(rules: Iterable[Rule], format: str = "text", enabled: Callable[[Rule], bool] = lambda rule: True) -> str:
    """The rule catalog as a terminal table (``text``) or a Markdown table (``markdown``)."""
    from tabulate import tabulate

    rows = rule_rows(rules, enabled)
    if format == "markdown":  # unpadded, so that a diff of the README shows only what changed
        lines = [RULE_COLUMNS, ("---",) * len(RULE_COLUMNS), *rows]
        return "\n".join("| " + " | ".join(md_cell(cell) for cell in line) + " |" for line in lines)
    return tabulate(rows, headers=RULE_COLUMNS, maxcolwidths=[None] * 6 + [60])
