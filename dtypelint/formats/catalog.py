"""The rule catalog: ``dtypelint rules`` as a terminal table, and as the Markdown table of the README; and
``python -m dtypelint.formats.catalog``, which writes the torch-free catalog (``dtypelint.rule_docs``) from
the rules themselves."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from dtypelint.formats.markdown import md_cell
from dtypelint.rule_docs import RULE_DOCS, RuleDoc, rule_docs_json

if TYPE_CHECKING:
    from dtypelint.rules.base import Rule

RULE_COLUMNS = ("code", "name", "pack", "severity", "fix", "enabled", "what it does")


def rule_rows(rules: Iterable[Rule | RuleDoc], enabled: Callable[[Rule | RuleDoc], bool] = lambda rule: True) -> list[tuple[str, ...]]:
    """One row per rule: identity, where it comes from, whether it can fix and whether it runs."""
    return [
        (rule.code, rule.name, rule.pack or "generic", rule.severity, rule.fix_availability,
         "yes" if enabled(rule) else "no", rule.summary)
        for rule in rules
    ]


def render_rules(rules: Iterable[Rule | RuleDoc], format: str = "text",
                 enabled: Callable[[Rule | RuleDoc], bool] = lambda rule: True) -> str:
    """The rule catalog as a terminal table (``text``) or a Markdown table (``markdown``)."""
    from tabulate import tabulate

    rows = rule_rows(rules, enabled)
    if format == "markdown":  # unpadded, so that a diff of the README shows only what changed
        lines = [RULE_COLUMNS, ("---",) * len(RULE_COLUMNS), *rows]
        return "\n".join("| " + " | ".join(md_cell(cell) for cell in line) + " |" for line in lines)
    return tabulate(rows, headers=RULE_COLUMNS, maxcolwidths=[None] * 6 + [60])


def rule_doc(rule: Rule) -> RuleDoc:
    return RuleDoc(rule.code, rule.name, rule.category, rule.pack, str(rule.severity), rule.fix_availability,
                   rule.summary, rule.docs)


def current_rule_docs() -> str:
    """``rule_docs.json`` as the shipped rules make it now."""
    from dtypelint.rules import all_rules

    return rule_docs_json([rule_doc(rule) for rule in all_rules()])


if __name__ == "__main__":
    RULE_DOCS.write_text(current_rule_docs(), encoding="utf-8")
    print(f"wrote {RULE_DOCS}")
