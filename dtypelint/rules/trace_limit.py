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
    of the forward ran unrecorded. And reports a decode step the forward refused with an error that is not
    about dtypes (a cache or mask length its code does not expect): dtypelint builds the step with the
    model's own `prepare_inputs_for_generation`, but `generate` may prepare it otherwise for this model.

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
        if context.error is None:
            return
        graph = context.graph
        failed = graph.failed_op()
        location = graph.op(failed)["module"] if failed else ""
        op = graph.op(failed)["name"] if failed else None
        if step := context.decode_step_refused:
            checked = "the prompt was" if step == 1 else f"the prompt and decode steps 1-{step - 1} were"
            yield self.finding(
                location=location,
                op=op,
                message=f"forward raised {type(context.error).__name__}: {first_line(context.error)}, which is not "
                f"a dtype error: the model's forward does not take the decode step as dtypelint prepared it; "
                f"{checked} checked, the rest was not (--steps {step} stops before it)",
                node=failed,
            )
            return
        if not context.stopped_at_trace_limit:
            return
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
