"""The documentation says what the code does: generated parts are current."""

from __future__ import annotations

import re
from pathlib import Path

from dtypelint.formats import render_rules
from dtypelint.rules import all_rules

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_rule_table_is_the_generated_one():
    block = re.search(r"<!-- rules-table:.*?-->\n(.*?)\n<!-- /rules-table -->", README.read_text(), re.S)
    assert block, "README.md lost its rules-table markers"
    assert block.group(1) == render_rules(all_rules(), "markdown"), (
        "README.md's rule table is stale: paste the output of `dtypelint rules --format markdown`"
    )
