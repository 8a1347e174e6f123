"""Settings: the ``[tool.dtypelint]`` table of ``pyproject.toml``, overridden by API or CLI arguments.

    [tool.dtypelint]
    backend = "ipex-llm-xpu"          # a shipped pack name or a path
    dtype = "float16"                 # the intended compute dtype
    rules = ["packs/our-kernels.toml"]  # extra packs whose contracts join the backend's
    select = ["DT", "IPX"]            # codes, code prefixes or rule names
    extend-select = []
    ignore = ["low-precision-op"]
    fail-on = "warning"               # the CLI's exit-1 threshold
    overflow-fraction = 0.5
    large-reduction = 65536
    max-ops = 200000                  # ops recorded per forward (DT002 past it)

    [tool.dtypelint.per-location-ignores]
    "model.layers.*.mlp" = ["DT104"]

    [tool.dtypelint.severity]
    DT102 = "error"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dtypelint.dtypes import parse_dtype
from dtypelint.errors import DtypelintError, LoadError, first_line
from dtypelint.report import SEVERITIES
from dtypelint.rules import Selection
from dtypelint.rules.base import Options, option_problem

_LIST_KEYS = {"select": "select", "extend-select": "extend_select", "ignore": "ignore", "rules": "rules"}
_OPTION_KEYS = {"overflow-fraction": "overflow_fraction", "large-reduction": "large_reduction", "max-ops": "max_ops"}


@dataclass
class Settings:
    backend: str = "hf-eager"
    dtype: str | None = None
    rules: list[str] = field(default_factory=list)
    selection: Selection = field(default_factory=Selection)
    options: Options = field(default_factory=Options)
    fail_on: str = "error"
    source: Path | None = None

    def override(self, **values: Any) -> Settings:
        """A copy where each argument that is not None replaces the setting (selection keys included)."""
        chosen = {key: value for key, value in values.items() if value is not None}
        selection_keys = {f.name for f in fields(Selection)}
        selection = replace(self.selection, **{k: v for k, v in chosen.items() if k in selection_keys})
        rest = {k: v for k, v in chosen.items() if k not in selection_keys}
        return replace(self, selection=selection, **rest)


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` at or above ``start`` (default: the working directory)."""
    directory = (start or Path.cwd()).resolve()
    for candidate in (directory, *directory.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate / "pyproject.toml"
    return None


def load_settings(path: Path | str | None = None) -> Settings:
    """Settings from ``path`` (a pyproject.toml), or from the nearest one; defaults when there is none
    or it has no ``[tool.dtypelint]`` table."""
    file = Path(path) if path is not None else find_pyproject()
    if file is None:
        return Settings()
    if not file.is_file():
        raise LoadError(f"config file {file} does not exist")
    try:
        document = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise LoadError(f"{file}: not valid TOML: {first_line(error)}") from None
    except OSError as error:
        raise LoadError(f"config file {file}: cannot read: {error.strerror or error}") from None
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
        if key in ("backend", "dtype", "fail-on"):
            if not isinstance(value, str):
                raise fail(key, "must be a string")
            values[key.replace("-", "_")] = value
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
        else:
            raise fail(key, "is not a known key")
    if "fail_on" in values and values["fail_on"] not in SEVERITIES:
        raise fail("fail-on", f"must be one of {', '.join(SEVERITIES)}")
    if "dtype" in values:
        try:
            parse_dtype(values["dtype"])
        except DtypelintError as error:
            raise fail("dtype", str(error)) from None
    if "rules" in values:
        # Pack paths are relative to the pyproject.toml that names them.
        values["rules"] = [str(file.parent / rule) if rule.endswith(".toml") else rule for rule in values["rules"]]
    return replace(settings.override(**values), options=Options(**options))
