"""The records of a fix: the plan of casts (``Change``, ``FixPlan``, stored as JSON) and what applying it
did (``FixResult``). ``dtypelint.fixes`` makes them; ``dtypelint.formats`` renders them; ``dtypelint.save``
stores the plan beside a fixed checkpoint.

A fix plan records the casts so they can be re-applied after any later load: ``inv_freq`` is a
non-persistent buffer that ``save_pretrained`` does not store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtypelint.dtypes import parse_dtype
from dtypelint.errors import LoadError, UsageError, first_line
from dtypelint.paths import local_path, parse_file, shown, write_file

if TYPE_CHECKING:
    from dtypelint.advisor import PrecisionPlan
    from dtypelint.report import Report

PLAN_VERSION = 1


@dataclass(frozen=True)
class Change:
    """Cast one parameter or buffer: one entry of a fix plan."""

    tensor: str
    from_dtype: str
    to_dtype: str
    code: str
    reason: str
    safety: str


@dataclass(frozen=True)
class IslandPlan:
    """Modules run as float32 islands in a ``dtype`` model (DT103's fix, from ``dtypelint.advisor``):
    applying it casts every other floating tensor to ``dtype``, the islands' to float32, and hooks cast the
    islands' floating inputs to float32 and their outputs back."""

    dtype: str
    modules: list[str]


@dataclass
class FixPlan:
    model: str
    changes: list[Change]
    islands: IslandPlan | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "model": self.model, "changes": [asdict(c) for c in self.changes],
                "islands": None if self.islands is None else asdict(self.islands)}

    def write(self, path: str | Path, *, sources: Sequence[str | Path] = ()) -> Path:
        """Write the plan as JSON, whole or not at all, never on, in or around ``sources`` (checkpoints)."""
        return write_file("the fix plan", path, json.dumps(self.to_dict(), indent=2) + "\n", sources)

    @classmethod
    def read(cls, path: str | Path) -> FixPlan:
        data = parse_file(local_path(path), json.loads, "JSON")
        try:
            if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
                raise ValueError(f"version {data.get('version') if isinstance(data, dict) else None!r}, "
                                 f"expected {PLAN_VERSION}")
            if not isinstance(data.get("changes"), list):
                raise ValueError("'changes' must be a list")
            islands = data.get("islands")
            if islands is not None:
                if not isinstance(islands, dict) or not isinstance(islands.get("modules"), list) or not all(
                        isinstance(name, str) for name in islands["modules"]) or not isinstance(islands.get("dtype"), str):
                    raise ValueError("'islands' must hold a dtype and a list of module names")
                islands = IslandPlan(islands["dtype"], list(islands["modules"]))
            plan = cls(str(data.get("model", "")), [Change(**entry) for entry in data["changes"]], islands)
            plan.validate()
        except (ValueError, TypeError) as error:
            raise LoadError(f"fix plan {shown(path)} is malformed: {first_line(error)}") from None
        return plan

    def validate(self) -> None:
        """Each change names a tensor and two dtypes as strings; a tensor appears once (twice with other
        dtypes is a contradiction). A UsageError (a ValueError) otherwise."""
        targets: dict[str, str] = {}
        for change in self.changes:
            if not isinstance(change, Change) or not all(isinstance(value, str) for value in astuple(change)):
                raise UsageError(f"a change must be a Change of strings, not {shown(repr(change))[:200]}")
            parse_dtype(change.to_dtype)
            if change.from_dtype != "?":
                parse_dtype(change.from_dtype)
            if targets.setdefault(change.tensor, change.to_dtype) != change.to_dtype:
                raise UsageError(f"{shown(change.tensor)} is cast twice, to {targets[change.tensor]} and to "
                                 f"{change.to_dtype}")
        if self.islands is not None:
            parse_dtype(self.islands.dtype)


@dataclass
class FixResult:
    """What ``fix`` did: the plan, whether it was applied and kept, and what it cost. ``before`` is the
    audit the plan came from, ``after`` the re-audit of the fixed model. Every format renders it
    (``dtypelint.formats.render(report, fix=result)``); ``str()`` is its one-line outcome."""

    plan: FixPlan
    applied: bool
    rolled_back: bool = False
    reason: str | None = None
    before: Report | None = None
    after: Report | None = None
    output_change: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    rope_error: dict[str, float] = field(default_factory=dict)
    unread: list[str] = field(default_factory=list)  # cast tensors the audited forward never read
    saved: Path | None = None  # where the fixed model was saved, by whoever saved it
    remarks: list[str] = field(default_factory=list)  # what the caller adds (the command line: --entry advice)
    not_saved: str | None = None  # a save that was asked for while nothing was fixed
    precision: PrecisionPlan | None = None  # DT103's verified precision plan, where one was searched for

    @property
    def changed(self) -> list[Change]:
        return self.plan.changes if self.applied and not self.rolled_back else []

    def summary_line(self) -> str:
        count = len(self.plan.changes)
        if not count:
            return "no fix to apply"
        if not self.applied:
            return f"would cast {count} tensor{'s' if count != 1 else ''} (dry run)"
        if self.rolled_back:
            return f"rolled back {count} cast{'s' if count != 1 else ''}: {self.reason}"
        return f"cast {count} tensor{'s' if count != 1 else ''}; re-audit: " + (
            self.after.summary_line() if self.after else "not run"
        )

    def __str__(self) -> str:
        return self.summary_line()
