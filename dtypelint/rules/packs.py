"""Backend rule packs: declarative TOML files in the top-level ``rules/`` folder, one per backend.

A pack says what a backend's kernels accept. It is data, never code: nothing in it is evaluated.
The schema is documented in ``rules/README.md``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path

from dtypelint.errors import LoadError, UsageError


@dataclass(frozen=True)
class BackendPack:
    name: str
    description: str
    intended_fp32: tuple[str, ...]
    path: Path

    def keeps_fp32(self, tensor: str) -> bool:
        """True for a tensor this backend wants in float32 whatever the compute dtype."""
        return any(fnmatchcase(tensor, pattern) for pattern in self.intended_fp32)


def pack_dir() -> Path:
    """Where the shipped packs are: inside the wheel, or the repository's ``rules/`` in a source tree."""
    installed = resources.files("dtypelint") / "packs"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parents[2] / "rules"


def available_packs() -> list[str]:
    return sorted(path.stem for path in pack_dir().glob("*.toml"))


def load_pack(name_or_path: str | Path) -> BackendPack:
    """Load a shipped pack by name (``ipex-llm-xpu``) or any pack by path (``my-pack.toml``)."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(text)
        if not path.is_file():
            raise LoadError(f"rule pack {path} does not exist")
    else:
        path = pack_dir() / f"{text}.toml"
        if not path.is_file():
            raise UsageError(f"unknown backend {text!r}; available: {', '.join(available_packs())}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise LoadError(f"{path}: not valid TOML: {error}") from None
    header = _table(data, "pack", path, "the file")
    name = _string(header, "name", path, "[pack]")
    return BackendPack(
        name=name,
        description=str(header.get("description", "")),
        intended_fp32=tuple(_strings(header, "intended-fp32", path, "[pack]")),
        path=path,
    )


def _table(data: dict, key: str, path: Path, where: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise LoadError(f"{path}: {where} needs a [{key}] table")
    return value


def _string(data: dict, key: str, path: Path, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise LoadError(f"{path}: {where}: '{key}' must be a non-empty string")
    return value


def _strings(data: dict, key: str, path: Path, where: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise LoadError(f"{path}: {where}: '{key}' must be a list of strings")
    return value
