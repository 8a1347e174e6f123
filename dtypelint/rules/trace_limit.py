"""DT002 trace-limit."""

from __future__ import annotations

from collections.abc import Iterator

from dtypelint.diagnostics import Finding, Severity
from dtypelint.errors import first_line
from dtypelint.rules.base import Rule, RuleContext


class TraceLimit(Rule):
    """
    ## What it does
    Reports where a meta-mode audit stopped because an op needs real values (`.item()`, `nonzero`,
    mixture-of-experts routing) that a tensor without data cannot give, or because torch's meta function
    of an op accepts less than its kernels (`aten._grouped_mm` takes only bfloat16 there). Also reports
    a forward longer than `max-ops` (default 200000): the trace stopped recording there and the rest
    of the forward ran unrecorded.

    ## Why is this bad?
    It is not a defect of the model: it means the ops after that point were not checked. Everything
    traced before it was checked as usual.

    ## Example
    `dtypelint check mixtral-config.json --mode meta` stops at the router's `nonzero`.

    Use instead: audit a real (small) checkpoint in value mode to cover the rest of the forward.

    ## Fix safety
    Nothing to fix.
    """

    code = "DT002"
    name = "trace-limit"
    severity = Severity.WARNING

    def check(self, context: RuleContext) -> Iterator[Finding]:
        self.looked(context)  # the forward
        yield from self._op_cap(context)
        if context.error is None or not context.stopped_at_trace_limit:
            return
        graph = context.graph
        failed = graph.failed_op()
        location = graph.op(failed)["module"] if failed else ""
        op = graph.op(failed)["name"] if failed else None
        traced = sum(1 for _ in graph.ops())
        logged = "".join(f"; torch logged: {line}" for line in graph.graph.get("torch_log", ()))
        yield self.finding(
            location=location,
            op=op,
            message=f"meta mode cannot run {op or 'this op'} ({first_line(context.error)}); "
            f"the {traced - 1 if failed else traced} ops before it were checked, the rest of the forward was not"
            f"{logged}",
            node=failed,
        )

    def _op_cap(self, context: RuleContext) -> Iterator[Finding]:
        run = context.graph.graph.get("ops_run", 0)
        recorded = context.graph.graph.get("ops_recorded", 0)
        if run > recorded:
            yield self.finding(
                location="",
                message=f"the forward ran {run} ops; only the first {recorded} were recorded (max-ops "
                f"{context.options.max_ops}), so the rules judged only that part",
            )
