"""Where the files shipped with dtypelint are. Standard library only: the command line lists the packs in
its ``--help`` without importing the rule engine (and torch)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from dtypelint.errors import UsageError


def pack_dir() -> Path:
    """Where the shipped packs are: inside the wheel, or the repository's ``rules/`` in a source tree."""
    installed = resources.files("dtypelint") / "packs"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parents[1] / "rules"


def available_packs() -> list[str]:
    return sorted(path.stem for path in pack_dir().glob("*.toml"))


def is_pack_path(text: str) -> bool:
    """``my-pack.toml`` or ``packs/x`` names a file; ``cuda`` names a shipped pack."""
    return text.endswith(".toml") or "/" in text or "\\" in text


def shipped_pack(name: str) -> Path:
    """The file of the shipped pack ``name``, or a UsageError listing the packs there are."""
    path = pack_dir() / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown backend {name!r}; available: {', '.join(available_packs())}")
    return path
