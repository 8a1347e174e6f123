"""Where the files shipped with dtypelint are. Standard library only: the command line lists the packs in
its ``--help`` without importing the rule engine (and torch)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def pack_dir() -> Path:
    """Where the shipped packs are: inside the wheel, or the repository's ``rules/`` in a source tree."""
    installed = resources.files("dtypelint") / "packs"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parents[1] / "rules"


def available_packs() -> list[str]:
    return sorted(path.stem for path in pack_dir().glob("*.toml"))
