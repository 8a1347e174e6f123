"""The rule catalog as text, readable without torch: ``dtypelint rules`` and ``dtypelint explain`` print it in
well under a second. ``rule_docs.json``, shipped beside this module, holds each shipped rule's identity and
docs (the generic rules' docstrings, the shipped packs' contracts); ``python -m dtypelint.formats.catalog``
writes it from the rules themselves, and a test fails when it differs from them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

RULE_DOCS = Path(__file__).with_name("rule_docs.json")


@dataclass(frozen=True)
class RuleDoc:
    """What the catalog shows of one rule: the attributes of ``dtypelint.rules.base.Rule`` that are text."""

    code: str
    name: str
    category: str
    pack: str | None
    severity: str
    fix_availability: str
    summary: str
    docs: str

    def explanation(self) -> str:
        """``dtypelint explain``'s text."""
        return (f"# {self.name} ({self.code})\n\ncategory: {self.category}, default severity: {self.severity}, "
                f"fix: {self.fix_availability}\n\n{self.docs}")


@functools.cache
def shipped_rule_docs() -> tuple[RuleDoc, ...]:
    """Every shipped rule, in ``dtypelint.rules.all_rules()`` order."""
    return tuple(RuleDoc(**entry) for entry in json.loads(RULE_DOCS.read_text(encoding="utf-8")))


def find_rule_doc(selector: str) -> RuleDoc | None:
    """The shipped rule with this code or name (a code in any case), or None."""
    return next((doc for doc in shipped_rule_docs() if selector.upper() == doc.code or selector == doc.name), None)


def rule_docs_json(docs: list[RuleDoc]) -> str:
    return json.dumps([asdict(doc) for doc in docs], indent=1, ensure_ascii=False) + "\n"
