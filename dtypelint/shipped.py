"""Where the files shipped with dtypelint are. Standard library only: the command line lists the packs in
its ``--help`` without importing the rule engine (and torch)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from dtypelint.errors import UsageError


def pack_dir() -> Path:
    """Where the shipped packs are: package data of ``dtypelint.packs`` (the repository's ``rules/`` links
    to it)."""
    return Path(str(resources.files("dtypelint") / "packs" / "shipped"))


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
