"""DT104 overflow-risk."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from dtypelint.diagnostics import Finding, Severity
from dtypelint.graph import finite
from dtypelint.rules.base import Rule, RuleContext


class OverflowRisk(Rule):
    """
    ## What it does
    In value mode, finds ops that produce float16/bfloat16 (or narrower) values beyond a fraction
    (`overflow-fraction`, default 0.5) of their dtype's largest value, one finding per module.

    ## Why is this bad?
    Values at half of float16's 65504 on a 16-token sample overflow on a longer or less typical input.
    The sample run passed; production will not.

    ## Example
    `model.layers.3.mlp.down_proj` returns 4.1e4 in float16: 63% of the range.

    Use instead: run that module in float32 or bfloat16, or scale its weights.

    ## Fix safety
    No automatic fix.

    ## Known problems
    Values that factories and fills write (attention masks hold `finfo.min` on purpose), values equal to
    the dtype's extreme, and values an input already carried are not reported: only the op that computed
    them is.

    ## Options
    `overflow-fraction` in `[tool.dtypelint]`.
    """

    code = "DT104"
    name = "overflow-risk"
    severity = Severity.WARNING
    uses_value_statistics = True

    def check(self, context: RuleContext) -> Iterator[Finding]:
        graph, fraction = context.graph, context.options.overflow_fraction
        reported: set[str] = set()
        for op in graph.ops():
            data = graph.op(op)
            if data["module"] in reported or not graph.computes_values(op):
                continue
            for tensor in graph.outputs(op):
                bounds = graph.value_range(tensor)
                dtype = graph.dtype(tensor)
                if bounds is None or not finite(bounds) or not dtype.is_floating_point:
                    continue
                self.looked(context)
                largest = _largest(dtype)
                peak = max((abs(bound) for bound in bounds if abs(bound) < largest), default=0.0)
                if peak < fraction * largest:
                    continue
                carried = max(
                    (max(map(abs, graph.value_range(t) or (0.0, 0.0))) for t in graph.floating_inputs(op)),
                    default=0.0,
                )
                if carried >= fraction * largest:
                    continue
                reported.add(data["module"])
                yield self.finding(
                    location=data["module"],
                    op=data["name"],
                    dtypes=[graph.tensor(tensor)["dtype"]],
                    message=f"{data['name']} produced values up to {peak:.4g}, {peak / largest:.0%} of "
                    f"{graph.tensor(tensor)['dtype']}'s largest value {largest:.6g}",
                    node=op,
                )
                break


@functools.cache
def _largest(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max
