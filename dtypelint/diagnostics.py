"""What a rule reports: a ``Finding``, its ``Severity`` and the ``Fix`` it proposes with its ``Applicability``.

The bottom of the house: rules make these, the report carries them, formats and fixes read them, and
none of that is imported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

ISLAND_CODE = "DT103"  # the rule whose fix is a precision plan (``dtypelint.advisor``)


class Severity(StrEnum):
    """How bad a finding is, in rank order. A ``StrEnum``: it is its name in JSON, TOML and on the command
    line."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return SEVERITIES.index(self)


SEVERITIES: tuple[Severity, ...] = tuple(Severity)


class Applicability(StrEnum):
    """Whether a fix may run unasked, as ruff's fix safety: ``safe`` keeps what the model computes,
    ``unsafe`` may cost precision (``--unsafe-fixes`` applies it)."""

    SAFE = "safe"
    UNSAFE = "unsafe"


ROOT_LOCATION = "<model>"  # how the model itself (location "") is shown
FINDING_COLUMNS = ("severity", "code", "pack", "location", "tensor", "dtypes", "message", "fix")  # of every findings table
CODE_COLUMNS = frozenset({"code", "location", "tensor"})  # names: set as code where a format can


@dataclass(frozen=True)
class Fix:
    """A proposed change: cast parameters or buffers to one dtype (none named: the fix finds them when it
    is applied, as DT103's precision plan does)."""

    tensors: tuple[str, ...]
    to_dtype: str
    safety: Applicability
    description: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "safety", Applicability(self.safety))

    def short(self) -> str:
        """``cast to float16 (unsafe)``: for a table cell or a one-line finding; a fix that names no tensor
        (DT103's precision plan, found when it is applied) by its description."""
        if not self.tensors:
            return f"{self.description} ({self.safety})"
        what = "" if len(self.tensors) == 1 else f" {len(self.tensors)} tensors"
        return f"cast{what} to {self.to_dtype} ({self.safety})"


@dataclass
class Finding:
    code: str
    category: str
    severity: Severity
    location: str
    tensor: str | None
    op: str | None
    dtypes: list[str]
    message: str
    fix: Fix | None = None
    node: str | None = None
    pack: str | None = None  # the backend pack whose contract found it; None for generic rules

    def __post_init__(self) -> None:
        self.severity = Severity(self.severity)

    def cells(self) -> tuple[str, ...]:
        """The ``FINDING_COLUMNS`` of this finding as plain text: each format escapes them its own way."""
        fix = f"{self.fix.description} ({self.fix.safety})" if self.fix else "no automatic fix"
        return (self.severity, self.code, self.pack or "", self.location or ROOT_LOCATION, self.tensor or "",
                " ".join(self.dtypes), self.message, fix)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("node")
        return data
