"""Stage 5 of the pipeline: the report that carries the findings (``dtypelint.diagnostics``) to the user."""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from dtypelint.diagnostics import FINDING_COLUMNS, SEVERITIES, Finding, Severity, group_findings
from dtypelint.escape import map_text, printable

if TYPE_CHECKING:
    from dtypelint.graph import DtypeGraph
    from dtypelint.inputs import SynthesizedInput

@dataclass(frozen=True)
class Rerun:
    """How to audit a model again exactly as a report's model was audited: what ``fix`` verifies with.
    ``inputs``: the forward's inputs; ``audit(model, **overrides)``: an audit with the same settings and
    compute dtype (``overrides`` as ``dtypelint.audit`` takes them)."""

    inputs: Any
    audit: Callable[..., Report]


@dataclass
class Report:
    """The result of an audit: the dtype graph, the findings and what was audited."""

    graph: DtypeGraph
    findings: list[Finding]
    model: str
    backend: str
    mode: str
    compute_dtype: str
    notes: list[str] = field(default_factory=list)
    tensor_dtypes: dict[str, str] = field(default_factory=dict, repr=False)  # parameters and buffers
    # Rule code -> how many sites it judged (ops, tensors, kernel calls): a silent rule that judged none
    # saw nothing to judge, which a negative control must tell from "judged it fine".
    judged: dict[str, int] = field(default_factory=dict)
    # Calls traced: 1, or a generative model's prompt and its decode steps (``Options.steps``).
    steps: int = 1
    # How to audit again the same way (value mode, for ``fix``); None for meta and static reports.
    rerun: Rerun | None = field(default=None, repr=False, compare=False)
    # What the loader chose: where the model's class came from ("architectures", "--model-class", a task
    # mapping), and the inputs it synthesized (empty for a model and inputs the caller gave).
    model_source: str | None = None
    made_inputs: list[SynthesizedInput] = field(default_factory=list)

    def by_code(self, code: str) -> list[Finding]:
        """The findings of one rule (``DT101``, ``IPX101``), in report order."""
        return [finding for finding in self.findings if finding.code == code]

    def by_severity(self, severity: Severity | str) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        return self.by_severity(Severity.ERROR)

    def at_or_above(self, severity: Severity | str) -> list[Finding]:
        rank = Severity(severity).rank
        return [finding for finding in self.findings if finding.severity.rank >= rank]

    def ordered(self) -> list[Finding]:
        """Errors first, then warnings, then infos; report order within a severity."""
        return sorted(self.findings, key=lambda finding: -finding.severity.rank)

    def counts(self) -> dict[str, int]:
        counter = Counter(finding.severity for finding in self.findings)
        return {severity: counter.get(severity, 0) for severity in reversed(SEVERITIES)}

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data; ``model_source`` and ``inputs`` only where dtypelint built the model
        and its inputs (a checkpoint or config), not for a model and inputs the caller gave."""
        loaded = {"model_source": self.model_source, "inputs": [asdict(made) for made in self.made_inputs]}
        return {
            "model": self.model,
            "backend": self.backend,
            "mode": self.mode,
            "compute_dtype": self.compute_dtype,
            "steps": self.steps,
            **(loaded if self.loaded_line() else {}),
            "summary": self.counts(),
            "graph": {"ops": sum(1 for _ in self.graph.ops()), "tensors": sum(1 for _ in self.graph.tensors())},
            "notes": list(self.notes),
            "findings": [finding.to_dict() for finding in self.findings],
            "groups": [{"code": group.finding.code, "location": group.finding.location, "count": group.count,
                        "message": group.finding.message,
                        "findings": [self.findings.index(member) for member in group.members]}
                       for group in group_findings(self.findings) if group.count > 1],
        }

    def loaded_line(self) -> str | None:
        """``built T5ForConditionalGeneration (config.architectures) on input_ids int64[1, 16], ...``: what
        the loader built and fed, where it chose them; None for a model and inputs the caller gave."""
        if self.model_source is None and not self.made_inputs:
            return None
        source = f" ({self.model_source})" if self.model_source else ""
        inputs = ", ".join(made.describe() for made in self.made_inputs) or "no synthesized inputs"
        return f"built {self.model}{source} on {inputs}"

    def summary_line(self) -> str:
        counts = self.counts()
        parts = [f"{count} {severity}{'s' if count != 1 else ''}" for severity, count in counts.items()]
        return f"{self.model} [{self.mode}, {self.compute_dtype}, backend {self.backend}]: " + ", ".join(parts)

    def table(self, message_width: int = 70) -> str:
        """The findings as a table. Names are never cut; the message wraps at ``message_width``."""
        rows = [(*finding.cells()[:-2], wrap_text(finding.message, message_width),
                 finding.fix.short() if finding.fix else "no automatic fix") for finding in self.ordered()]
        return tabulate(rows, headers=FINDING_COLUMNS, tablefmt="simple",
                        disable_numparse=True)  # module "1" is a name, not a number to right-align

    def render(self) -> str:
        """The table, the notes and the summary line, as ``print(report)`` shows them: every text from the
        model printable (``escape.printable``)."""
        shown = map_text(self, printable)
        lines = [shown.table()] if shown.findings else []
        lines += [f"note: {note}" for note in shown.notes]
        lines += [line for line in (shown.loaded_line(),) if line]
        lines.append(shown.summary_line())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def wrap_text(text: str, width: int, subsequent_indent: str = "") -> str:
    """``text`` wrapped at spaces to ``width``, never inside a word: a name longer than that overflows its line
    rather than being split (``model.layers`` / ``.0.mlp``), and a bracketed shape or range (``int64[1, 16]``,
    ``[inf, inf]``) stays on one line."""
    kept = re.sub(r"\[[^\]]*\]", lambda bracketed: bracketed.group().replace(" ", "\xa0"), text)
    return textwrap.fill(kept, width, subsequent_indent=subsequent_indent, break_long_words=False,
                         break_on_hyphens=False).replace("\xa0", " ")
