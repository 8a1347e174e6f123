"""Tests that need ipex-llm and the transformers 4.37 it pins (the per-layer rotary layout).

They run in the ipex virtual environment (see README); elsewhere they are skipped.
"""

from __future__ import annotations

import pytest

pytest.importorskip("ipex_llm", reason="needs the ipex-llm environment (.venv-ipex)")


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.ipex)
