"""Settings: the ``[tool.dtypelint]`` table of ``pyproject.toml``, overridden by API or CLI arguments.

    [tool.dtypelint]
    backend = "ipex-llm-xpu"          # a shipped pack name or a path, or a list of them
    dtype = "float16"                 # the intended compute dtype
    attn-implementation = "flash_attention_2"  # the attention the deployment runs (flash: a CPU stand-in)
    packs = ["packs/our-kernels.toml"]  # extra packs whose contracts join the backend's
    select = ["DT", "IPX"]            # codes, code prefixes or rule names
    extend-select = []
    ignore = ["low-precision-op"]
    fail-on = "warning"               # the CLI's exit-1 threshold
    overflow-fraction = 0.5
    large-reduction = 65536
    max-ops = 200000                  # ops recorded per forward (DT002 past it)
    max-input-elements = 33554432     # per input synthesized from a config (value mode)
    max-layers = 1024                 # layers per stack, or experts per layer, a config may ask for
    steps = 2                         # calls traced of a generative model: the prompt, then decode steps
    precision-tolerance = 0.01        # `dtypelint precision`: the output error accepted (default: per output kind)

    [tool.dtypelint.per-location-ignores]
    "model.layers.*.mlp" = ["DT104"]

    [tool.dtypelint.severity]
    DT102 = "error"
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, TypedDict

import torch

from dtypelint.attention import check_attention_implementation, runs_cuda_kernels
from dtypelint.diagnostics import SEVERITIES
from dtypelint.dtypes import dtype_name, parse_dtype
from dtypelint.errors import DtypelintError, LoadError, UsageError
from dtypelint.packs.schema import BackendPack, combine, load_pack
from dtypelint.paths import find_pyproject, parse_file
from dtypelint.rules import Selection, all_rules
from dtypelint.rules.base import Options, Rule, option_problem

_LIST_KEYS = {"select": "select", "extend-select": "extend_select", "ignore": "ignore", "packs": "packs"}
_OPTION_KEYS = {"overflow-fraction": "overflow_fraction", "large-reduction": "large_reduction", "max-ops": "max_ops",
                "max-input-elements": "max_input_elements", "max-layers": "max_layers", "steps": "steps",
                "precision-tolerance": "precision_tolerance"}


class SettingOverrides(TypedDict, total=False):
    """The settings an API call, a marker or the command line may set; None means "not set here"."""

    backend: str | Sequence[str] | None  # one pack, or several (a device pack and a quantization pack)
    dtype: str | torch.dtype | None  # "auto": the model's own
    packs: str | Sequence[str] | None  # extra packs whose contracts join the backend's
    select: str | Sequence[str] | None
    extend_select: str | Sequence[str] | None
    ignore: str | Sequence[str] | None
    per_location_ignores: Mapping[str, list[str]] | None
    severity: Mapping[str, str] | None
    options: Options | Mapping[str, Any] | None  # a mapping changes only the fields it names
    fail_on: str | None
    attn_implementation: str | None  # "flash_attention_2": traced with a CPU stand-in, checked as flash


SETTING_KEYS = tuple(SettingOverrides.__annotations__)
_SELECTION_KEYS = tuple(f.name for f in fields(Selection))
_LIST_VALUED = ("backend", "packs", "select", "extend_select", "ignore")


@dataclass
class Settings:
    """What an audit runs with. ``layered`` puts the layers on top of each other (file < ini < command
    line < markers < keywords); ``pack`` and ``rules`` are loaded once, on first use."""

    backend: tuple[str, ...] = ("hf-eager",)
    dtype: str | None = None
    packs: tuple[str, ...] = ()
    selection: Selection = field(default_factory=Selection)
    options: Options = field(default_factory=Options)
    fail_on: str = "error"
    attn_implementation: str | None = None  # None: the model config's own
    source: Path | None = None

    def layered(self, *layers: Mapping[str, Any]) -> Settings:
        """A copy with each layer's set keys on top, lowest layer first, validated."""
        settings = self
        for layer in layers:
            settings = settings.layer(layer)
        settings.validate()
        return settings

    def layer(self, layer: Mapping[str, Any]) -> Settings:
        """A copy with one layer's set keys on top (checked, but packs and selectors not yet validated)."""
        unknown = sorted(set(layer) - set(SETTING_KEYS))
        if unknown:
            raise UsageError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_KEYS)}")
        values = {key: value for key, value in layer.items() if value is not None}
        for key in _LIST_VALUED:
            if key in values:
                names = _names(values[key], key)
                values[key] = list(names) if key in _SELECTION_KEYS else names
        if "dtype" in values:
            values["dtype"] = _dtype_setting(values["dtype"])
        if "fail_on" in values and values["fail_on"] not in SEVERITIES:
            raise UsageError(f"fail_on {values['fail_on']!r} is not one of {', '.join(SEVERITIES)}")
        if isinstance(values.get("options"), Mapping):
            values["options"] = _changed_options(self.options, values["options"])
        selection = replace(self.selection, **{key: values.pop(key) for key in _SELECTION_KEYS if key in values})
        return replace(self, selection=selection, **values)

    def validate(self) -> None:
        """Fail on a typo before any model work: packs, selectors, options."""
        if not isinstance(self.options, Options):
            raise UsageError(f"options must be a dtypelint Options or a mapping, not {type(self.options).__name__}")
        self.selection.validate(all_rules() + self.rules)
        if self.attn_implementation is not None:
            check_attention_implementation(self.attn_implementation)

    @cached_property
    def pack(self) -> BackendPack:
        """The backend's packs, the extra packs and the packs the flags bring, combined (each file parsed
        once per process)."""
        return combine([load_pack(name) for name in (*self.backend, *self.packs, *self.brought_packs)])

    @cached_property
    def brought_packs(self) -> tuple[str, ...]:
        """Shipped packs a flag brings, since it names their deployment: a flash attention implementation
        (or a diffusers backend such as sage) runs CUDA kernels, so the CUDA contracts come with it (a UsageError beside another
        device's pack)."""
        if self.attn_implementation is None or not runs_cuda_kernels(self.attn_implementation):
            return ()
        devices = {pack.device: pack.name for name in (*self.backend, *self.packs) if (pack := load_pack(name)).device}
        if "cuda" in devices:
            return ()
        if devices:
            device, name = next(iter(devices.items()))
            raise UsageError(f"attn_implementation {self.attn_implementation!r} runs CUDA kernels; "
                             f"backend {name} deploys on {device}")
        return ("cuda",)

    @cached_property
    def rules(self) -> list[Rule]:
        """The rules this audit runs: the generic rules and the contracts of ``pack``."""
        return all_rules([self.pack])


def _names(value: str | Sequence[str], key: str) -> tuple[str, ...]:
    """``"cuda,bitsandbytes"``, ``"DT1"`` or a list of them as a tuple of names."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(item, str) for item in items):
        raise UsageError(f"{key} takes a string or a list of strings, not {value!r}")
    names = tuple(part.strip() for item in items for part in item.split(",") if part.strip())
    if key == "backend" and not names:
        raise UsageError("backend needs at least one pack name")
    return names


def _dtype_setting(value: str | torch.dtype) -> str | None:
    """A dtype setting as its name; "auto" (the model's own) as None."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    return dtype_name(parse_dtype(value))


def _changed_options(options: Options, changes: Mapping[str, Any]) -> Options:
    try:
        return replace(options, **changes)
    except TypeError:
        known = ", ".join(f.name for f in fields(Options))
        raise UsageError(f"options takes {known}, not {dict(changes)}") from None


def load_settings(path: Path | str | None = None) -> Settings:
    """Settings from ``path`` (a pyproject.toml), or from the nearest one; defaults when there is none
    or it has no ``[tool.dtypelint]`` table."""
    file = Path(path) if path is not None else find_pyproject()
    if file is None:
        return Settings()
    if not file.is_file():
        raise LoadError(f"config file {file} does not exist")
    document = parse_file(file, tomllib.loads, "TOML")
    return _parse(_dtypelint_table(document, file), file)


def _dtypelint_table(document: dict[str, Any], file: Path) -> dict[str, Any]:
    """``[tool.dtypelint]``, or {} when absent; a ``tool`` or ``tool.dtypelint`` that is not a table
    (``tool = 5``, ``[[tool.dtypelint]]``) is an error, not a silent default."""
    tool = document.get("tool", {})
    if not isinstance(tool, dict):
        raise LoadError(f"{file}: 'tool' must be a table, not {_toml_kind(tool)}")
    table = tool.get("dtypelint", {})
    if not isinstance(table, dict):
        raise LoadError(f"{file}: 'tool.dtypelint' must be a table ([tool.dtypelint]), not {_toml_kind(table)}")
    return table


_TOML_KINDS = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array"}


def _toml_kind(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return "an array of tables"
    return _TOML_KINDS.get(type(value), f"a {type(value).__name__}")


def _parse(table: dict[str, Any], file: Path) -> Settings:
    def fail(key: str, problem: str) -> LoadError:
        return LoadError(f"{file}: [tool.dtypelint]: '{key}' {problem}")

    settings = Settings(source=file)
    values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in table.items():
        if key in ("dtype", "fail-on", "attn-implementation"):
            if not isinstance(value, str):
                raise fail(key, "must be a string")
            values[key.replace("-", "_")] = value
        elif key == "backend":
            if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise fail(key, "must be a pack name or a list of them")
            values["backend"] = value
        elif key in _LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise fail(key, "must be a list of strings")
            values[_LIST_KEYS[key]] = list(value)
        elif key in _OPTION_KEYS:
            problem = option_problem(_OPTION_KEYS[key], value)
            if problem:
                raise fail(key, f"{problem}, not {value!r}")
            options[_OPTION_KEYS[key]] = value
        elif key == "per-location-ignores":
            if not isinstance(value, dict) or not all(
                isinstance(codes, list) and all(isinstance(code, str) for code in codes) for codes in value.values()
            ):
                raise fail(key, "must be a table of module globs to lists of codes")
            values["per_location_ignores"] = dict(value)
        elif key == "severity":
            if not isinstance(value, dict) or not all(isinstance(level, str) for level in value.values()):
                raise fail(key, "must be a table of codes to severities")
            values["severity"] = dict(value)
        elif key == "rules":
            raise fail(key, "is now called 'packs'")
        else:
            raise fail(key, "is not a known key")
    for key in ("backend", "packs"):  # pack paths are relative to the pyproject.toml that names them
        if key in values:
            names = [values[key]] if isinstance(values[key], str) else values[key]
            values[key] = [str(file.parent / name) if name.endswith(".toml") else name for name in names]
    try:
        return settings.layer({**values, "options": Options(**options)})
    except DtypelintError as error:
        raise LoadError(f"{file}: [tool.dtypelint]: {error}") from None
