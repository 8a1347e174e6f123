"""DT103 nonfinite."""

from __future__ import annotations

import math
from collections.abc import Iterator

from dtypelint.graph import DtypeGraph
from dtypelint.report import Finding
from dtypelint.rules.base import Rule, RuleContext


# Ops that write a value given by the code (a mask's -inf or finfo.min), not one computed from inputs.
FILL_OPS = frozenset(
    {"aten.masked_fill", "aten.masked_fill_", "aten.fill", "aten.fill_", "aten.index_fill", "aten.index_fill_",
     "aten.full_like", "aten.new_full"}
)


def computes_values(graph: DtypeGraph, op: str) -> bool:
    """False for factories and fills, whose extreme values are chosen on purpose."""
    return bool(graph.floating_inputs(op)) and graph.nodes[op]["name"] not in FILL_OPS


def value_range(graph: DtypeGraph, tensor: str) -> tuple[float, float] | None:
    """(min, max) recorded for a tensor or, for a view, for the tensor it views."""
    data = graph.nodes[graph.source(tensor)]
    return (data["min"], data["max"]) if "min" in data else None


def finite(bounds: tuple[float, float] | None) -> bool:
    return bounds is None or (math.isfinite(bounds[0]) and math.isfinite(bounds[1]))


def format_range(bounds: tuple[float, float] | None) -> str:
    return "unknown" if bounds is None else f"[{bounds[0]:.4g}, {bounds[1]:.4g}]"


class Nonfinite(Rule):
    """
    ## What it does
    In value mode, finds the first op that produces inf or NaN from finite inputs, and reports its input
    ranges.

    ## Why is this bad?
    float16 tops out at 65504. One activation past it becomes inf, the next normalisation turns it into
    NaN, and the model emits garbage (or NaN logits that break sampling) with no exception. The first op
    that overflowed is where to act; every op after it only propagates the damage.

    ## Example
    A float16 MLP whose up projection produces 7e4 for a long prompt: ``aten.mm`` returns inf.

    Use instead: keep that layer (``_keep_in_fp32_modules``) or the whole model in bfloat16/float32, or
    rescale the weights.

    ## Fix safety
    No automatic fix.

    ## Known problems
    Needs value statistics (``audit(..., stats=True)``, the default); meta mode has no values.
    """

    code = "DT103"
    name = "nonfinite"
    category = "nonfinite"
    severity = "error"

    def check(self, context: RuleContext) -> Iterator[Finding]:
        graph = context.graph
        for op in graph.ops():
            produced = [t for t in graph.outputs(op) if not finite(value_range(graph, t))]
            if not produced or not computes_values(graph, op):
                continue
            inputs = graph.floating_inputs(op)
            ranges = [value_range(graph, tensor) for tensor in inputs]
            if not all(finite(bounds) for bounds in ranges):
                return  # inputs already non-finite: an earlier op (or the input) is the origin
            data = graph.nodes[op]
            output = graph.nodes[produced[0]]
            described = "; ".join(
                f"{graph.describe(tensor)} {graph.nodes[tensor]['dtype']} {format_range(bounds)}"
                for tensor, bounds in zip(inputs, ranges, strict=True)
            )
            yield self.finding(
                location=data["module"],
                op=data["name"],
                dtypes=sorted({output["dtype"], *(graph.nodes[t]["dtype"] for t in inputs)}),
                message=f"{data['name']} produced non-finite values ({output['dtype']} range "
                f"{format_range(value_range(graph, produced[0]))}) from finite inputs: {described}",
                node=op,
            )
            return
