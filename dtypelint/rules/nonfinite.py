"""DT103 nonfinite."""

from __future__ import annotations

from collections.abc import Iterator

from dtypelint.graph import finite, format_range
from dtypelint.report import Finding
from dtypelint.rules.base import Rule, RuleContext


class Nonfinite(Rule):
    """
    ## What it does
    In value mode, finds each op that produces inf or NaN in a float16/bfloat16 (or narrower) tensor from
    finite inputs (the origin, not the ops that propagate it), and reports its input ranges.

    ## Why is this bad?
    float16 tops out at 65504. One activation past it becomes inf, the next normalisation turns it into
    NaN, and the model emits garbage (or NaN logits that break sampling) with no exception. The first op
    that overflowed is where to act; every op after it only propagates the damage.

    ## Example
    A float16 MLP whose up projection produces 7e4 for a long prompt: `aten.mm` returns inf.

    Use instead: keep that layer (`_keep_in_fp32_modules`) or the whole model in bfloat16/float32, or
    rescale the weights.

    ## Fix safety
    No automatic fix.

    ## Known problems
    Needs value statistics (`audit(..., stats=True)`, the default); meta mode has no values. float32
    and float64 tensors are not measured (cost), so a NaN made in float32 is reported where it first
    reaches a half-precision tensor.
    """

    code = "DT103"
    name = "nonfinite"
    severity = "error"
    uses_value_statistics = True

    def check(self, context: RuleContext) -> Iterator[Finding]:
        graph = context.graph
        for op in graph.ops():
            produced = [t for t in graph.outputs(op) if not finite(graph.value_range(t))]
            if not produced or not graph.computes_values(op):
                continue
            inputs = graph.floating_inputs(op)
            ranges = [graph.value_range(tensor) for tensor in inputs]
            if not all(finite(bounds) for bounds in ranges):
                continue  # inputs already non-finite: an earlier op (or the input) is the origin
            data = graph.op(op)
            output = graph.tensor(produced[0])
            described = "; ".join(
                f"{graph.describe(tensor)} {graph.tensor(tensor)['dtype']} {format_range(bounds)}"
                for tensor, bounds in zip(inputs, ranges, strict=True)
            )
            yield self.finding(
                location=data["module"],
                op=data["name"],
                dtypes=sorted({output["dtype"], *(graph.tensor(t)["dtype"] for t in inputs)}),
                message=f"{data['name']} produced non-finite values ({output['dtype']} range "
                f"{format_range(graph.value_range(produced[0]))}) from finite inputs: {described}",
                node=op,
            )
