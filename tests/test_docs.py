"""The documentation says what the code does: generated parts are current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import readme_blocks, run_readme_block

from dtypelint.formats.catalog import render_rules
from dtypelint.rules import all_rules

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_rule_table_is_the_generated_one():
    block = re.search(r"<!-- rules-table:.*?-->\n(.*?)\n<!-- /rules-table -->", README.read_text(), re.S)
    assert block, "README.md lost its rules-table markers"
    assert block.group(1) == render_rules(all_rules(), "markdown"), (
        "README.md's rule table is stale: paste the output of `dtypelint rules --format markdown`"
    )


def test_every_python_block_of_the_readme_names_where_it_runs():
    text = README.read_text()
    blocks = text.count("```python")
    marked = sum(len(readme_blocks(kind)) for kind in (".venv", ".venv-ipex", "pytest"))
    assert blocks == marked >= 3


@pytest.mark.parametrize("block", readme_blocks(".venv"), ids=lambda block: block.splitlines()[3][:40])
def test_the_readme_api_block_runs_as_written(block, tmp_path):
    run_readme_block(block, tmp_path)


def test_the_readme_pytest_block_runs_as_written(tmp_path):
    (tmp_path / "test_readme_example.py").write_text(readme_blocks("pytest")[0])
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-3000:]
    assert "3 audits in 2 tests; 0 tests failed assert_clean" in result.stdout


def test_shipped_examples_hold_no_path_of_the_machine_that_built_them():
    examples = README.parent / "examples"
    for file in examples.rglob("*.json"):
        text = file.read_text()
        assert str(README.parent) not in text and '"/' not in text, file


def test_the_readme_lists_every_output_format():
    from dtypelint.formats import FORMATS

    assert f"`--format {'|'.join(FORMATS)}`" in " ".join(README.read_text().split())
