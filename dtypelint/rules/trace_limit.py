"""DT002 trace-limit."""

from __future__ import annotations

from collections.abc import Iterator

from dtypelint.report import Finding
from dtypelint.rules.base import Rule, RuleContext


def is_trace_limit(error: BaseException) -> bool:
    """True for the exceptions by which fake tensors refuse data-dependent or unsupported ops."""
    from torch._subclasses import fake_tensor

    limits = (
        fake_tensor.DataDependentOutputException,
        fake_tensor.DynamicOutputShapeException,
        fake_tensor.UnsupportedOperatorException,
    )
    return isinstance(error, limits) or "data-dependent" in str(error) or "meta tensor" in str(error)


class TraceLimit(Rule):
    """
    ## What it does
    Reports where a meta-mode audit stopped because an op needs real values (``.item()``, ``nonzero``,
    mixture-of-experts routing) that a tensor without data cannot give.

    ## Why is this bad?
    It is not a defect of the model: it means the ops after that point were not checked. Everything
    traced before it was checked as usual.

    ## Example
    ``dtypelint check mixtral-config.json --mode meta`` stops at the router's ``nonzero``.

    Use instead: audit a real (small) checkpoint in value mode to cover the rest of the forward.

    ## Fix safety
    Nothing to fix.
    """

    code = "DT002"
    name = "trace-limit"
    category = "trace-limit"
    severity = "warning"

    def check(self, context: RuleContext) -> Iterator[Finding]:
        error = context.error
        if error is None or not is_trace_limit(error):
            return
        graph = context.graph
        failed = graph.failed_op()
        location = graph.nodes[failed]["module"] if failed else ""
        op = graph.nodes[failed]["name"] if failed else None
        traced = sum(1 for _ in graph.ops())
        yield self.finding(
            location=location,
            op=op,
            message=f"meta mode cannot run {op or 'this op'} (it needs real values); "
            f"the {traced - 1 if failed else traced} ops before it were checked, the rest of the forward was not",
            node=failed,
        )
