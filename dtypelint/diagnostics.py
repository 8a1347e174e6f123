"""What a rule reports: a ``Finding``, its ``Severity`` and the ``Fix`` it proposes with its ``Applicability``.

The bottom of the house: rules make these, the report carries them, formats and fixes read them, and
none of that is imported here.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

ISLAND_CODE = "DT103"  # the rule whose fix is a precision plan (``dtypelint.advisor``)
FORWARD_ERROR_CODE = "DT001"  # the forward raised
MIXED_INPUT_CODE = "DT101"  # an op got a mix of dtypes: often why the forward raised


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


# One cause in many layers ------------------------------------------------------------------------------------

_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.\w+)+")  # module, parameter and buffer names: model.layers.0.self_attn
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a layer index inside one of them
_SLOT = "\x00"


def _indexed(text: str, numbers: list[int]) -> str:
    """``text`` with each layer index inside a dotted name replaced by a slot; the indices go to ``numbers``."""
    def slotted(name: re.Match[str]) -> str:
        def slot(index: re.Match[str]) -> str:
            numbers.append(int(index.group()))
            return _SLOT
        return _INDEX.sub(slot, name.group())
    return _DOTTED.sub(slotted, text)


def _indices(values: set[int]) -> str:
    """``{0..79}``, ``{0,2,5}``, ``{0..3,7}``: the indices one slot takes across a group; one index bare."""
    if len(values) == 1:
        return str(next(iter(values)))
    ordered, runs = sorted(values), []
    start = previous = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        runs.append(str(start) if start == previous else f"{start},{previous}" if previous == start + 1
                    else f"{start}..{previous}")
        if value is not None:
            start = previous = value
    return "{" + ",".join(runs) + "}"


@dataclass(frozen=True)
class FindingGroup:
    """Findings of one rule that differ only in the layer indices of the names they mention (the same fault in
    each of 80 decoder layers): ``finding`` is the first, with each index that varies shown as the set it
    takes (``model.layers.{0..79}.self_attn``); ``members`` are all of them, in report order."""

    finding: Finding
    members: tuple[Finding, ...]

    @property
    def count(self) -> int:
        return len(self.members)


def group_findings(findings: list[Finding]) -> list[FindingGroup]:
    """``findings`` grouped by rule, severity, pack, op, dtypes and the texts they show with layer indices
    taken out (location, tensor, message, fix), in order of each group's first member."""
    groups: dict[tuple, list[tuple[Finding, list[int]]]] = {}
    for finding in findings:
        numbers: list[int] = []
        shaped = tuple(_indexed(text or "", numbers) for text in (
            finding.location, finding.tensor, finding.message, finding.fix.description if finding.fix else None))
        key = (finding.code, finding.severity, finding.pack, finding.op, tuple(finding.dtypes), shaped,
               (finding.fix.to_dtype, finding.fix.safety) if finding.fix else None)
        groups.setdefault(key, []).append((finding, numbers))
    return [_group(members) for members in groups.values()]


def _group(members: list[tuple[Finding, list[int]]]) -> FindingGroup:
    first, _ = members[0]
    if len(members) == 1:
        return FindingGroup(first, (first,))
    slots = [{numbers[slot] for _, numbers in members} for slot in range(len(members[0][1]))]
    shown = iter(_indices(values) for values in slots)

    def patterned(text: str | None) -> str | None:
        if text is None:
            return None
        return _DOTTED.sub(lambda name: _INDEX.sub(lambda _: next(shown), name.group()), text)

    location, tensor, message = (patterned(text) for text in (first.location, first.tensor, first.message))
    fix = first.fix
    if fix is not None:
        tensors = tuple(dict.fromkeys(name for finding, _ in members for name in finding.fix.tensors))
        fix = Fix(tensors, fix.to_dtype, fix.safety, patterned(fix.description) or "")
    return FindingGroup(replace(first, location=location or "", tensor=tensor, message=message, fix=fix),
                        tuple(finding for finding, _ in members))
