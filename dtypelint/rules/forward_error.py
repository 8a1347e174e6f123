"""DT001 forward-error."""

from __future__ import annotations

from collections.abc import Iterator

from dtypelint.diagnostics import Finding, Severity
from dtypelint.dtypes import dtype_name
from dtypelint.errors import first_line
from dtypelint.rules.base import Rule, RuleContext, input_cast_advice


class ForwardError(Rule):
    """
    ## What it does
    Reports that the sample forward pass raised, with the op that raised and its input dtypes.

    ## Why is this bad?
    The model cannot run as loaded: the same exception (for example `mat1 and mat2 must have the same
    dtype`) will stop the deployment. The trace up to the failing op is kept, so the other rules can
    say which tensor caused it.

    ## Example
    A model converted with `.half()` whose `lm_head` was re-created in float32 afterwards.

    Use instead: load with one dtype (`from_pretrained(path, dtype=torch.float16)`) or cast the stray
    layer.

    ## Fix safety
    No automatic fix: the cause is named by `mixed-input` or a kernel contract where dtypelint knows it.
    """

    code = "DT001"
    name = "forward-error"
    severity = Severity.ERROR

    def check(self, context: RuleContext) -> Iterator[Finding]:
        error = context.error
        self.looked(context)  # the forward
        if error is None or context.stopped_at_trace_limit or context.decode_step_refused:
            return
        graph = context.graph
        failed = graph.failed_op()
        message = f"forward raised {type(error).__name__}: {first_line(error)}"
        if failed is None:
            yield self.finding(location=graph.graph.get("failure_module") or "", message=message)
            return
        data = graph.op(failed)
        inputs = [node for node, _ in graph.inputs(failed)]
        odd = _odd_operands(context, inputs)
        compute = dtype_name(context.compute_dtype)
        yield self.finding(
            location=data["module"],
            tensor=next(filter(None, map(graph.blamed_leaf, odd)), None),
            op=data["name"],
            dtypes=[graph.tensor(node)["dtype"] for node in inputs],
            message=f"{message} (at {data['name']} with inputs "
            + ", ".join(f"{graph.describe(node)} {graph.tensor(node)['dtype']}" for node in inputs)
            + ")" + (input_cast_advice(graph, odd[0], compute) if odd else ""),
            node=failed,
        )


def _odd_operands(context: RuleContext, inputs: list[str]) -> list[str]:
    """The operands off the compute dtype when the op that raised got several floating dtypes, weights
    before biases: the parameter, buffer or input behind the first is the root cause the error row names."""
    graph, compute = context.graph, dtype_name(context.compute_dtype)
    floating = [node for node in inputs if graph.dtype(node).is_floating_point]
    if len({graph.tensor(node)["dtype"] for node in floating}) < 2:
        return []
    return sorted((node for node in floating if graph.tensor(node)["dtype"] != compute),
                  key=lambda node: -len(graph.tensor(node)["shape"]))
