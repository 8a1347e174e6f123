"""What every rule is: a code, a name, a category, a default severity, docs, and a ``check``."""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import torch

from dtypelint.diagnostics import Finding, Fix, Severity
from dtypelint.errors import UsageError
from dtypelint.inputs import MAX_INPUT_ELEMENTS
from dtypelint.load import MAX_LAYERS
from dtypelint.tracer import is_dtype_error, needs_values
from dtypelint.vocabulary import OpKind, OriginKind

if TYPE_CHECKING:
    from dtypelint.graph import DtypeGraph
    from dtypelint.model_info import ModelInfo
    from dtypelint.packs.operands import ModelSites
    from dtypelint.packs.schema import BackendPack


@dataclass
class Options:
    """Tunable thresholds of the generic rules and bounds of an audit (``[tool.dtypelint]`` keys in kebab
    case)."""

    overflow_fraction: float = 0.5
    large_reduction: int = 65536
    max_ops: int = 200_000  # ops recorded per forward; past it the trace only counts (DT002)
    max_input_elements: int = MAX_INPUT_ELEMENTS  # per input synthesized from a config, in value mode
    max_layers: int = MAX_LAYERS  # layers per stack, or experts per layer, a config may ask for
    steps: int = 2  # calls traced of a generative model: the prompt, then decode steps fed the cache it returned
    precision_tolerance: float | None = None  # ``dtypelint precision``'s output error bound (None: per output kind)

    def __post_init__(self) -> None:
        for option in fields(self):
            value = getattr(self, option.name)
            problem = option_problem(option.name, value)
            if problem:
                raise UsageError(f"{option.name} {problem}, not {value!r}")


def option_problem(name: str, value: object) -> str | None:
    """Why ``value`` cannot be the option ``name`` (snake case), or None: the one check that API
    ``Options(...)`` and ``[tool.dtypelint]`` share. A nan fraction would compare false everywhere and
    turn values into findings; booleans are not numbers here."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "overflow_fraction":
        valid = number and math.isfinite(value) and 0 < value <= 1
        return None if valid else "must be a positive number, at most 1"
    if name == "precision_tolerance":
        valid = value is None or (number and math.isfinite(value) and value > 0)
        return None if valid else "must be a positive number"
    valid = number and isinstance(value, int) and value > 0
    return None if valid else "must be a positive integer"


@dataclass
class RuleContext:
    """Everything a rule may look at. Rules read it; the one thing they write is ``judged``: how many sites
    each rule looked at (``Rule.looked``), so that a silent rule is seen to have judged something."""

    graph: DtypeGraph
    model: ModelInfo
    compute_dtype: torch.dtype
    pack: BackendPack
    error: BaseException | None = None
    options: Options = field(default_factory=Options)
    judged: Counter[str] = field(default_factory=Counter)

    @property
    def traced(self) -> bool:
        """False for ``--static``: the rules see the model's tensors but no forward."""
        return self.graph.graph.get("mode") != "static"

    @cached_property
    def stopped_at_trace_limit(self) -> bool:
        """True when the forward stopped at a limit of meta mode rather than a defect of the model: fake
        tensors refusing a data-dependent or unsupported op, or a meta function narrower than the kernel
        (DT002 reports it; DT001 leaves it alone)."""
        if needs_values(self.error):
            return True
        failed = self.graph.failed_op()
        meta = self.graph.graph["mode"] == "meta"
        return meta and failed is not None and self.graph.op_is(failed, OpKind.NARROWER_IN_META)

    @cached_property
    def dtype_error(self) -> bool:
        """True when the forward raised an error about dtypes."""
        return self.error is not None and is_dtype_error(self.error)

    @cached_property
    def decode_step_refused(self) -> int | None:
        """The decode step the forward raised on with an error that is not about dtypes (a cache or mask
        length its code does not expect), or None. dtypelint builds that step as ``generate`` does, but
        ``generate`` may prepare it otherwise for this model, so the error says nothing certain of the
        deployment: DT002 reports it, DT001 and DT101 leave it alone. A limit of meta mode (a data-dependent
        op) is not a refusal: DT002 says which op meta mode cannot run."""
        if self.error is None or self.dtype_error or self.stopped_at_trace_limit:
            return None
        failed = self.graph.failed_op()
        step = self.graph.op(failed)["step"] if failed is not None else len(self.graph.graph.get("step_starts", ()))
        return step or None

    @cached_property
    def sites(self) -> ModelSites:
        from dtypelint.packs.operands import ModelSites

        return ModelSites(self.graph, self.model)


class Rule:
    """Base class. Subclasses set the class attributes, write their docs in ruff's sections as the
    class docstring, and implement ``check``."""

    code: ClassVar[str]
    name: ClassVar[str]
    category: ClassVar[str]  # default: the name (a rule that is its own category)
    severity: ClassVar[Severity]
    fix_availability: ClassVar[str] = "never"  # never | sometimes | always
    uses_value_statistics: ClassVar[bool] = False  # runs only on graphs with value statistics
    pack: str | None = None  # the backend pack a contract rule comes from
    judges_model_only: ClassVar[bool] = False  # needs the model's tensors, not the trace (runs in static mode)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls) and "category" not in vars(cls):
            cls.category = cls.name

    @property
    def docs(self) -> str:
        return inspect.cleandoc(type(self).__doc__ or "")

    @property
    def summary(self) -> str:
        """The first paragraph of "What it does", on one line."""
        return " ".join(self.section("What it does").split("\n\n")[0].split()) or self.name

    def section(self, title: str) -> str:
        """The text of one ``## title`` section of the docs (empty when there is none)."""
        match = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", self.docs, re.S | re.M)
        return match.group(1).strip() if match else ""

    def check(self, context: RuleContext) -> Iterable[Finding]:
        raise NotImplementedError

    def looked(self, context: RuleContext, sites: int = 1) -> None:
        """Count ``sites`` this rule judged (a finding or not): ``Report.judged``."""
        context.judged[self.code] += sites

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
        severity: Severity | None = None,
    ) -> Finding:
        """``severity``: lower than the rule's for a finding it is less sure of (kept under overrides)."""
        return Finding(
            code=self.code,
            category=self.category,
            severity=severity or self.severity,
            location=location,
            tensor=tensor,
            op=op,
            dtypes=list(dtypes or []),
            message=message,
            fix=fix,
            node=node,
            pack=self.pack,
        )

    def __repr__(self) -> str:
        return f"<rule {self.code} {self.name}>"


def input_cast_advice(graph: DtypeGraph, operand: str, dtype: str) -> str:
    """``; cast the input X to D before the call (...)`` where ``operand`` is one of the forward's inputs (or
    a view or copy of one): the caller passes it, so no fix of the model's tensors can; else ``""``."""
    source = graph.tensor(graph.source(operand, through_copies=True))
    if source["origin"] != OriginKind.INPUT or not source["name"]:
        return ""
    return f"; cast the input {source['name']} to {dtype} before the call ({source['name']}.to(torch.{dtype}))"
