"""What every rule is: a code, a name, a category, a default severity, docs, and a ``check``."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import torch

from dtypelint.report import Finding, Fix

if TYPE_CHECKING:
    from dtypelint.graph import DtypeGraph
    from dtypelint.rules.packs import BackendPack
    from dtypelint.rules.sites import ModelSites
    from dtypelint.trace import ModelInfo


@dataclass
class Options:
    """Tunable thresholds of the generic rules (``[tool.dtypelint]`` keys in kebab case)."""

    overflow_fraction: float = 0.5
    large_reduction: int = 65536
    max_ops: int = 200_000  # ops recorded per forward; past it the trace only counts (DT002)


@dataclass
class RuleContext:
    """Everything a rule may look at. Rules read it; none of them changes it."""

    graph: DtypeGraph
    model: ModelInfo
    compute_dtype: torch.dtype
    pack: BackendPack
    error: BaseException | None = None
    options: Options = field(default_factory=Options)

    @cached_property
    def sites(self) -> ModelSites:
        from dtypelint.rules.sites import ModelSites

        return ModelSites(self.graph, self.model)


class Rule:
    """Base class. Subclasses set the class attributes, write their docs in ruff's sections as the
    class docstring, and implement ``check``."""

    code: ClassVar[str]
    name: ClassVar[str]
    category: ClassVar[str]
    severity: ClassVar[str]
    fix_availability: ClassVar[str] = "never"  # never | sometimes | always
    uses_value_statistics: ClassVar[bool] = False  # runs only on graphs with value statistics

    @property
    def docs(self) -> str:
        return inspect.cleandoc(type(self).__doc__ or "")

    @property
    def summary(self) -> str:
        match = re.search(r"## What it does\s*\n(.+?)(?:\n\n|\Z)", self.docs, re.S)
        return " ".join(match.group(1).split()) if match else self.name

    def check(self, context: RuleContext) -> Iterable[Finding]:
        raise NotImplementedError

    def finding(
        self,
        *,
        location: str,
        message: str,
        tensor: str | None = None,
        op: str | None = None,
        dtypes: list[str] | None = None,
        fix: Fix | None = None,
        node: str | None = None,
    ) -> Finding:
        return Finding(
            code=self.code,
            category=self.category,
            severity=self.severity,
            location=location,
            tensor=tensor,
            op=op,
            dtypes=list(dtypes or []),
            message=message,
            fix=fix,
            node=node,
        )

    def __repr__(self) -> str:
        return f"<rule {self.code} {self.name}>"
