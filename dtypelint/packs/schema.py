"""Backend rule packs: declarative TOML files, one per backend (the shipped ones in ``shipped/``).

A pack says what a backend's kernels accept. It is data, never code: nothing in it is evaluated. The
schema is documented in ``shipped/README.md`` (``rules/README.md`` in the repository); a malformed pack raises ``LoadError`` naming the file, the
entry and the problem.
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from dtypelint.autocast import POLICIES
from dtypelint.diagnostics import SEVERITIES
from dtypelint.dtypes import dtype_name, parse_dtype
from dtypelint.errors import DtypelintError, LoadError
from dtypelint.packs.operands import valid_selector
from dtypelint.paths import parse_file
from dtypelint.shipped import is_pack_path, shipped_pack

_CODE = re.compile(r"^[A-Z]{2,5}[0-9]{3}$")
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Contract:
    """One kernel's dtype contract (a ``[[contract]]`` entry)."""

    code: str
    name: str
    kernel: str
    summary: str
    why: str
    references: tuple[str, ...]
    modules: tuple[str, ...]
    tensors: tuple[str, ...]
    severity: str = "error"
    owner: str | None = None
    not_owner: str | None = None
    model_types: tuple[str, ...] = ()
    must_match: str | None = None
    must_match_label: str = ""
    accepted_dtypes: tuple[str, ...] = ()
    gate_dtypes: tuple[str, ...] = ()
    head_dims: tuple[int, ...] = ()
    fix: str = "none"
    fix_safety: str = "unsafe"
    fix_cost: str = ""
    example: str = ""
    known_problems: str = ""
    hint: str = ""  # appended to every message: what to change
    site: str = "module"  # module | op | attention: what one check looks at
    ops: tuple[str, ...] = ()  # op sites: the aten ops (``native_layer_norm``)
    calls: str = "any"  # attention sites: flash | sdpa | diffusers | any
    max_head_dim: int | None = None
    dispatch: str | None = None  # attention sites: raises | falls-back, from CUDA's SDPA dispatch model
    pack: str = ""  # the name of the pack that declares it (set on load; kept when packs are combined)
    source: Path | None = None  # the pack file that declares it


@dataclass(frozen=True)
class BackendPack:
    name: str
    description: str
    intended_fp32: tuple[str, ...]
    contracts: tuple[Contract, ...]
    paths: tuple[Path, ...]
    autocast: str = "cpu"  # whose autocast policy a trace under autocast applies (dtypelint.autocast.POLICIES)
    device: str | None = None  # the device it deploys on ("cuda", "xpu"); None: any

    def keeps_fp32(self, tensor: str) -> bool:
        """True for a tensor this backend wants in float32 whatever the compute dtype."""
        return any(fnmatchcase(tensor, pattern) for pattern in self.intended_fp32)



def combine(packs: list[BackendPack]) -> BackendPack:
    """One pack from several (a device pack and a quantization pack, plus extra packs): their contracts
    and float32 intents together, named ``cuda+bitsandbytes``."""
    if len(packs) == 1:
        return packs[0]
    contracts = tuple(contract for pack in packs for contract in pack.contracts)
    codes = [contract.code for contract in contracts]
    if duplicate := next((code for code in codes if codes.count(code) > 1), None):
        raise LoadError(f"contract code {duplicate} is defined by more than one of the packs in use")
    return BackendPack(
        name="+".join(dict.fromkeys(pack.name for pack in packs)),
        description="; ".join(pack.description for pack in packs if pack.description),
        intended_fp32=tuple(pattern for pack in packs for pattern in pack.intended_fp32),
        contracts=contracts,
        paths=tuple(path for pack in packs for path in pack.paths),
        autocast=next((pack.autocast for pack in packs if pack.autocast != "cpu"), "cpu"),
        device=_one_device(packs),
    )


def _one_device(packs: list[BackendPack]) -> str | None:
    """The device of a deployment made of ``packs``: one at most."""
    devices = {pack.device: pack.name for pack in packs if pack.device}
    if len(devices) > 1:
        named = " and ".join(f"{name} ({device})" for device, name in devices.items())
        raise LoadError(f"packs {named} deploy on different devices; one deployment runs on one")
    return next(iter(devices), None)


def load_pack(name_or_path: str | Path) -> BackendPack:
    """Load a shipped pack by name (``ipex-llm-xpu``) or any pack by path (``my-pack.toml``). Each file is
    parsed once per process (again only when it changes)."""
    text = str(name_or_path)
    path = Path(text) if is_pack_path(text) else shipped_pack(text)
    if not path.is_file():
        raise LoadError(f"rule pack {path} does not exist")
    status = path.stat()
    return _parse_pack(path.resolve(), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=64)
def _parse_pack(path: Path, modified: int, size: int) -> BackendPack:
    data = parse_file(path, tomllib.loads, "TOML")
    _Entry(path, "the file", data).only({"pack", "contract"})
    header = _Entry(path, "[pack]", data.get("pack"))
    header.only({"name", "description", "intended-fp32", "autocast", "device"})
    autocast = header.string("autocast", "cpu")
    if autocast not in POLICIES:
        raise header.error("autocast", f"must be one of {', '.join(POLICIES)}")
    entries = data.get("contract", [])
    if not isinstance(entries, list):
        raise LoadError(f"{path}: 'contract' must be an array of tables ([[contract]])")
    contracts = tuple(_contract(_Entry(path, f"[[contract]] #{number}", entry)) for number, entry in enumerate(entries, 1))
    codes = [contract.code for contract in contracts]
    if duplicate := next((code for code in codes if codes.count(code) > 1), None):
        raise LoadError(f"{path}: code {duplicate} is used by more than one contract")
    name = header.string("name")
    return BackendPack(
        name=name,
        description=header.string("description", ""),
        intended_fp32=tuple(header.strings("intended-fp32")),
        contracts=tuple(replace(contract, pack=name, source=path) for contract in contracts),
        paths=(path,),
        autocast=autocast,
        device=header.string("device", None),
    )


def _contract(entry: _Entry) -> Contract:
    entry.only(
        {
            "code", "name", "kernel", "summary", "why", "references", "modules", "tensors", "severity", "owner",
            "not-owner", "model-types", "must-match", "must-match-label", "accepted-dtypes", "gate-dtypes", "head-dims", "fix",
            "fix-safety", "fix-cost", "example", "known-problems", "hint", "site", "ops", "calls", "max-head-dim",
            "dispatch",
        }
    )
    code = entry.string("code")
    entry.where = f"contract {code}"
    if not _CODE.match(code):
        raise entry.error("code", "must look like IPX101 (2-5 capitals, 3 digits)")
    name = entry.string("name")
    if not _NAME.match(name):
        raise entry.error("name", "must be kebab-case")
    site = entry.choice("site", ("module", "op", "attention"), "module")
    dispatch = entry.choice("dispatch", ("raises", "falls-back", "none"), "none")
    calls = entry.choice("calls", ("flash", "sdpa", "diffusers", "any"), "any")
    # A diffusers backend's contract is its own registered checks: no selector needed.
    selectors = [*entry.strings("tensors", required=site == "module" or (dispatch == "none" and calls != "diffusers"))]
    must_match = entry.string("must-match", None)
    for selector in [*selectors, *([must_match] if must_match else [])]:
        if not valid_selector(selector, site):
            raise entry.error("tensors", f"unknown selector {selector!r} for {site} sites (see rules/README.md)")
    ops = tuple(entry.strings("ops", required=site == "op"))
    if dispatch != "none" and site != "attention":
        raise entry.error("dispatch", "needs site = \"attention\"")
    return Contract(
        code=code,
        name=name,
        kernel=entry.string("kernel"),
        summary=entry.string("summary"),
        why=entry.string("why"),
        references=tuple(entry.strings("references", required=True)),
        modules=tuple(entry.strings("modules", required=site == "module")),
        tensors=tuple(selectors),
        severity=entry.choice("severity", SEVERITIES, "error"),
        owner=entry.string("owner", None),
        not_owner=entry.string("not-owner", None),
        model_types=tuple(entry.strings("model-types")),
        must_match=must_match,
        must_match_label=entry.string("must-match-label", ""),
        accepted_dtypes=entry.dtypes("accepted-dtypes"),
        gate_dtypes=entry.dtypes("gate-dtypes"),
        head_dims=tuple(entry.integers("head-dims")),
        fix=entry.choice("fix", ("cast", "none"), "none"),
        fix_safety=entry.choice("fix-safety", ("safe", "unsafe"), "unsafe"),
        fix_cost=entry.string("fix-cost", ""),
        example=entry.string("example", ""),
        known_problems=entry.string("known-problems", ""),
        hint=entry.string("hint", ""),
        site=site,
        ops=ops,
        calls=calls,
        max_head_dim=entry.integer("max-head-dim"),
        dispatch=None if dispatch == "none" else dispatch,
    )


class _Entry:
    """Typed access to one TOML table, failing with the file, the entry and the key."""

    _MISSING: Any = object()

    def __init__(self, path: Path, where: str, data: Any) -> None:
        self.path, self.where = path, where
        if not isinstance(data, dict):
            raise LoadError(f"{path}: {where} is missing or not a table")
        self.data = data

    def error(self, key: str, problem: str) -> LoadError:
        return LoadError(f"{self.path}: {self.where}: '{key}' {problem}")

    def only(self, keys: set[str]) -> None:
        for key in self.data:
            if key not in keys:
                raise self.error(key, f"is not a known key (known: {', '.join(sorted(keys))})")

    def _get(self, key: str, default: Any) -> Any:
        if key not in self.data:
            if default is self._MISSING:
                raise self.error(key, "is required")
            return default
        return self.data[key]

    def string(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is not default and (not isinstance(value, str) or not value.strip()):
            raise self.error(key, "must be a non-empty string")
        return value

    def strings(self, key: str, *, required: bool = False) -> list[str]:
        value = self._get(key, self._MISSING if required else [])
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise self.error(key, "must be a list of non-empty strings")
        if required and not value:
            raise self.error(key, "must not be empty")
        return value

    def integers(self, key: str) -> list[int]:
        value = self._get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            raise self.error(key, "must be a list of integers")
        return value

    def integer(self, key: str) -> int | None:
        value = self._get(key, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise self.error(key, "must be a positive integer")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self._get(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def dtypes(self, key: str) -> tuple[str, ...]:
        names = self.strings(key)
        try:
            return tuple(dtype_name(parse_dtype(name)) for name in names)
        except DtypelintError as error:
            raise self.error(key, str(error)) from None
