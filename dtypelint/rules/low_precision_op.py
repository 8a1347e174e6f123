"""DT106 low-precision-op."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator

from dtypelint.report import Finding
from dtypelint.rules.base import Rule, RuleContext

HALF = frozenset({"float16", "bfloat16"})
SENSITIVE_OPS = frozenset(
    {
        "aten._softmax", "aten.softmax", "aten._log_softmax", "aten.log_softmax", "aten.exp", "aten.cumsum",
        "aten.cumprod", "aten.logsumexp", "aten.var", "aten.var_mean", "aten.std", "aten.std_mean",
        "aten.linalg_vector_norm", "aten.norm",
    }
)
REDUCTIONS = frozenset({"aten.sum", "aten.mean", "aten.prod"})


class LowPrecisionOp(Rule):
    """
    ## What it does
    Notes numerically sensitive ops that run in float16 or bfloat16: softmax, log-softmax, exp, cumsum,
    logsumexp, variance and norms, the mean of a square (a norm's variance), and reductions over more
    than ``large-reduction`` elements. One finding per op and module pattern (layers grouped).

    ## Why is this bad?
    These ops lose most of their accuracy in half precision: a bfloat16 softmax over a long sequence, or
    an RMSNorm variance summed in float16, drifts enough to change generations. transformers computes
    them in float32 on purpose (``softmax(..., dtype=torch.float32)``, RMSNorm's ``.to(torch.float32)``).

    ## Example
    ``torch.softmax(scores_fp16, -1)`` in a custom attention.

    Use instead: ``torch.softmax(scores, -1, dtype=torch.float32).to(scores.dtype)``.

    ## Fix safety
    No automatic fix: the cast belongs in the model code.

    ## Options
    ``large-reduction`` in ``[tool.dtypelint]`` (default 65536 elements).
    """

    code = "DT106"
    name = "low-precision-op"
    category = "low-precision-op"
    severity = "info"

    def check(self, context: RuleContext) -> Iterator[Finding]:
        graph, limit = context.graph, context.options.large_reduction
        groups: Counter[tuple[str, str, str]] = Counter()
        first: dict[tuple[str, str, str], str] = {}
        for op in graph.ops():
            data = graph.nodes[op]
            inputs = graph.floating_inputs(op)
            if not inputs or graph.nodes[inputs[0]]["dtype"] not in HALF:
                continue
            reason = self._reason(context, op, inputs[0], limit)
            if reason is None:
                continue
            key = (data["name"], re.sub(r"(?<![^.])\d+(?![^.])", "*", data["module"]), reason)
            groups[key] += 1
            first.setdefault(key, op)
        for key, count in groups.items():
            name, pattern, reason = key
            dtype = graph.nodes[graph.floating_inputs(first[key])[0]]["dtype"]
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
        name = graph.nodes[op]["name"]
        if name in SENSITIVE_OPS:
            return "numerically sensitive"
        if name not in REDUCTIONS:
            return None
        producer = graph.producer(source)
        if name == "aten.mean" and producer and graph.nodes[producer]["name"] == "aten.pow":
            return "variance of a norm"
        outputs = graph.outputs(op)
        reduced = math.prod(graph.nodes[source]["shape"]) // max(1, math.prod(graph.nodes[outputs[0]]["shape"])) if outputs else 0
        return f"reduction over {reduced} elements" if reduced > limit else None
