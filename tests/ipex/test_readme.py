"""The README's ipex-llm environment blocks run as written."""

from __future__ import annotations

import pytest
from helpers import readme_blocks, run_readme_block


@pytest.mark.parametrize("block", readme_blocks(".venv-ipex"), ids=lambda block: block.splitlines()[3][:40])
def test_the_readme_fix_block_runs_as_written(block, tmp_path):
    run_readme_block(block, tmp_path)
    assert (tmp_path / "fixes.json").is_file() and (tmp_path / "fixed-checkpoint" / "config.json").is_file()
