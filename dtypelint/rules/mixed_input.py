"""DT101 mixed-input."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch

from dtypelint.diagnostics import Applicability, Finding, Fix, Severity
from dtypelint.dtypes import dtype_name
from dtypelint.graph import DtypeGraph
from dtypelint.rules.base import Rule, RuleContext, input_cast_advice
from dtypelint.vocabulary import CASTABLE_ORIGINS, OpKind, OriginKind


def _operands(graph: DtypeGraph, op: str) -> list[str]:
    """The inputs that must share a dtype: the floating ones, and at a one-dtype kernel the integer ones too
    (``mat1 and mat2 must have the same dtype, but got Long and Half``, which fake tensors do not raise).
    Scaled-dot-product attention also takes a bool or float32 mask with any query dtype ("Expected
    attn_mask dtype to be bool or float or to match query dtype")."""
    if not graph.op_is(op, OpKind.ONE_DTYPE):
        return graph.floating_inputs(op)
    inputs = [node for node, _ in graph.inputs(op) if graph.dtype(node) != torch.bool]
    if not graph.op_is(op, OpKind.ATTENTION):
        return inputs
    by_argument = {argument: node for node, argument in graph.inputs(op)}
    query = by_argument.get("0")
    return [
        node for node in inputs
        if by_argument.get("attn_mask", by_argument.get("3")) != node
        or graph.tensor(node)["dtype"] not in ("float32", query and graph.tensor(query)["dtype"])
    ]


class MixedInput(Rule):
    """
    ## What it does
    Flags an op whose floating tensor inputs have different dtypes where the op needs one dtype: the
    matmul family, convolutions and scaled-dot-product attention (an integer operand among floating
    ones too: a timestep left int64 into a linear), and any op at which the forward raised.

    ## Why is this bad?
    These kernels do not promote. `F.linear` with a float16 activation and a float32 weight raises
    `RuntimeError: mat1 and mat2 must have the same dtype` (CPU, CUDA) or aborts inside a fused
    backend kernel. A layer left in float32 in a float16 model is the usual cause.

    ## Example
    ```python
    model = build().half()
    model.head = nn.Linear(64, 10)      # created after .half(): float32
    model(x)                            # RuntimeError in the head's addmm
    ```

    Use instead: create the layer before casting, or `model.head.half()`.

    ## Fix safety
    The fix casts the odd parameter or buffer to the dtype the other inputs share. It is safe: the op
    cannot run with both dtypes, so the value is rounded exactly as the working model's other weights
    were.

    ## Known problems
    Explicit casts (`.float()`, `.to()`) are never reported. Norm kernels are not in the list:
    torch's layer_norm accepts a float32 weight with a half input; backend packs state stricter norms.

    ## References
    - https://pytorch.org/docs/stable/amp.html (ops autocast casts because they need one dtype)
    """

    code = "DT101"
    name = "mixed-input"
    severity = Severity.ERROR
    fix_availability = "sometimes"

    def check(self, context: RuleContext) -> Iterator[Finding]:
        graph = context.graph
        self.looked(context, sum(1 for op in graph.ops() if graph.op_is(op, OpKind.ONE_DTYPE)))
        conflicts = set(graph.dtype_conflicts())
        for op in graph.ops():
            data = graph.op(op)
            if not graph.op_is(op, OpKind.ONE_DTYPE) and not (op in conflicts and data["failed"] and context.dtype_error):
                continue
            inputs = _operands(graph, op)
            present = {graph.tensor(node)["dtype"] for node in inputs}
            if len(present) < 2:
                continue
            counts = Counter(graph.tensor(node)["dtype"] for node in inputs)
            compute = dtype_name(context.compute_dtype)
            expected = compute if compute in present else max(counts, key=counts.__getitem__)
            # Weights before biases: the matrix operand is what users recognise.
            odd_operands = sorted(
                (node for node in inputs if graph.tensor(node)["dtype"] != expected),
                key=lambda node: -len(graph.tensor(graph.source(node))["shape"]),
            )
            odd = [graph.source(node) for node in odd_operands]
            names = [graph.tensor(node)["name"] for node in odd if graph.tensor(node)["origin"] in CASTABLE_ORIGINS]
            fix = Fix(tuple(names), expected, Applicability.SAFE, f"cast {', '.join(names)} to {expected}") if names else None
            described = ", ".join(
                f"{graph.describe(node) if graph.tensor(node)['dtype'] == expected else graph.describe_derived(node)} "
                f"{graph.tensor(node)['dtype']}"
                for node in inputs
            )
            message = f"{data['name']} needs one dtype but receives {described}" + input_cast_advice(
                graph, odd_operands[0], expected)
            location, tensor = data["module"], graph.blamed_leaf(odd_operands[0])
            if leak := _leaked_cast(graph, odd[0]):
                location, message = graph.op(leak)["module"], f"{_leak_story(graph, leak, op)}; {message}"
            yield self.finding(
                location=location,
                tensor=tensor,
                op=data["name"],
                dtypes=sorted(present),
                message=message,
                fix=fix,
                node=op,
            )


def _leaked_cast(graph: DtypeGraph, node: str) -> str | None:
    """The explicit cast of an activation (``x.float()`` in a norm) that gave an odd operand its dtype."""
    if graph.tensor(node)["origin"] != OriginKind.OP:
        return None
    casts = graph.lineage(node).casts
    return casts[0] if casts else None


def _leak_story(graph: DtypeGraph, cast: str, op: str) -> str:
    source = graph.floating_inputs(cast)[0]
    made = graph.tensor(graph.outputs(cast)[0])["dtype"]
    module = graph.op(cast)["module"] or "<model>"
    reaches = f"reaches {graph.op(op)['name']} in {graph.op(op)['module'] or '<model>'} without a cast back"
    if graph.op(cast)["autocast"]:
        user = next((graph.op(consumer)["name"] for consumer in graph.consumers(graph.outputs(cast)[0])), "the op")
        return (f"{graph.graph['autocast_policy']} autocast upcasts {graph.describe(source)} from "
                f"{graph.tensor(source)['dtype']} to {made} for {user} in {module} (on its {made} list), "
                f"and the result {reaches}")
    return (f"{module} casts {graph.describe(source)} from {graph.tensor(source)['dtype']} to {made} explicitly "
            f"({graph.op(cast)['name']}) and its result {reaches}")
