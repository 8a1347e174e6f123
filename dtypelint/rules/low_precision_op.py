"""DT106 low-precision-op."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator

import torch

from dtypelint.diagnostics import Finding, Severity
from dtypelint.rules.base import Rule, RuleContext
from dtypelint.vocabulary import OpKind

HALF = frozenset({"float16", "bfloat16"})
aten = torch.ops.aten


class LowPrecisionOp(Rule):
    """
    ## What it does
    Notes numerically sensitive ops that run in float16 or bfloat16: softmax, log-softmax, exp, cumsum,
    logsumexp, variance and norms, the mean of a square (a norm's variance), and reductions over more
    than `large-reduction` elements. One finding per op and module pattern (layers grouped).

    ## Why is this bad?
    These ops lose most of their accuracy in half precision: a bfloat16 softmax over a long sequence, or
    an RMSNorm variance summed in float16, drifts enough to change generations. transformers computes
    them in float32 on purpose (`softmax(..., dtype=torch.float32)`, RMSNorm's `.to(torch.float32)`).

    ## Example
    `torch.softmax(scores_fp16, -1)` in a custom attention.

    Use instead: `torch.softmax(scores, -1, dtype=torch.float32).to(scores.dtype)`.

    ## Fix safety
    No automatic fix: the cast belongs in the model code.

    ## Options
    `large-reduction` in `[tool.dtypelint]` (default 65536 elements).
    """

    code = "DT106"
    name = "low-precision-op"
    severity = Severity.INFO

    def check(self, context: RuleContext) -> Iterator[Finding]:
        graph, limit = context.graph, context.options.large_reduction
        groups: Counter[tuple[str, str, str]] = Counter()
        first: dict[tuple[str, str, str], str] = {}
        for op in graph.ops():
            data = graph.op(op)
            inputs = graph.floating_inputs(op)
            if not inputs or graph.tensor(inputs[0])["dtype"] not in HALF:
                continue
            self.looked(context)
            reason = self._reason(context, op, inputs[0], limit)
            if reason is None:
                continue
            key = (data["name"], re.sub(r"(?<![^.])\d+(?![^.])", "*", data["module"]), reason)
            groups[key] += 1
            first.setdefault(key, op)
        for key, count in groups.items():
            name, pattern, reason = key
            dtype = graph.tensor(graph.floating_inputs(first[key])[0])["dtype"]
            yield self.finding(
                location=pattern,
                op=name,
                dtypes=[dtype],
                message=f"{name} runs in {dtype} ({reason}) in {count} place{'s' if count != 1 else ''}",
                node=first[key],
            )

    @staticmethod
    def _reason(context: RuleContext, op: str, source: str, limit: int) -> str | None:
        graph = context.graph
        if graph.op_is(op, OpKind.SENSITIVE):
            return "numerically sensitive"
        if not graph.op_is(op, OpKind.REDUCTION):
            return None
        producer = graph.producer(source)
        if graph.op(op)["packet"] is aten.mean and producer and graph.op(producer)["packet"] is aten.pow:
            return "variance of a norm"
        outputs = graph.outputs(op)
        reduced = math.prod(graph.tensor(source)["shape"]) // max(1, math.prod(graph.tensor(outputs[0])["shape"])) if outputs else 0
        return f"reduction over {reduced} elements" if reduced > limit else None
