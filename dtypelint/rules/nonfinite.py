"""DT103 nonfinite."""

from __future__ import annotations

import math
from collections.abc import Iterator

from dtypelint.graph import MOVING_OPS, VIEW_OPS, DtypeGraph
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
    """(min, max) recorded for a tensor; for views and copies (not measured, to save time) the range of
    what they copy: the first input's, or the union of a concatenation's inputs."""
    data = graph.nodes[tensor]
    if "min" in data:
        return data["min"], data["max"]
    op = graph.producer(tensor)
    if op is None:
        return None
    name = graph.nodes[op]["name"]
    if name in ("aten.cat", "aten.stack"):
        ranges = [value_range(graph, source) for source, _ in graph.inputs(op)]
        if any(bounds is None for bounds in ranges):
            return None
        return min(bounds[0] for bounds in ranges), max(bounds[1] for bounds in ranges)  # type: ignore[index]
    if name in VIEW_OPS or name in MOVING_OPS:
        return value_range(graph, graph.inputs(op)[0][0])
    return None


def finite(bounds: tuple[float, float] | None) -> bool:
    return bounds is None or (math.isfinite(bounds[0]) and math.isfinite(bounds[1]))


def format_range(bounds: tuple[float, float] | None) -> str:
    return "unknown" if bounds is None else f"[{bounds[0]:.4g}, {bounds[1]:.4g}]"


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
    A float16 MLP whose up projection produces 7e4 for a long prompt: ``aten.mm`` returns inf.

    Use instead: keep that layer (``_keep_in_fp32_modules``) or the whole model in bfloat16/float32, or
    rescale the weights.

    ## Fix safety
    No automatic fix.

    ## Known problems
    Needs value statistics (``audit(..., stats=True)``, the default); meta mode has no values. float32
    and float64 tensors are not measured (cost), so a NaN made in float32 is reported where it first
    reaches a half-precision tensor.
    """

    code = "DT103"
    name = "nonfinite"
    category = "nonfinite"
    severity = "error"
    uses_value_statistics = True

    def check(self, context: RuleContext) -> Iterator[Finding]:
        graph = context.graph
        for op in graph.ops():
            produced = [t for t in graph.outputs(op) if not finite(value_range(graph, t))]
            if not produced or not computes_values(graph, op):
                continue
            inputs = graph.floating_inputs(op)
            ranges = [value_range(graph, tensor) for tensor in inputs]
            if not all(finite(bounds) for bounds in ranges):
                continue  # inputs already non-finite: an earlier op (or the input) is the origin
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
