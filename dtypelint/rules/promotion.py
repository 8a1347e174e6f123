"""DT102 promotion."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dtypelint.diagnostics import Applicability, Finding, Fix, Severity
from dtypelint.dtypes import dtype_name, wider
from dtypelint.graph import DtypeGraph
from dtypelint.rules.base import Rule, RuleContext
from dtypelint.vocabulary import CASTABLE_ORIGINS, STREAM_ORIGINS, WEIGHT_ORIGINS, OpKind, OriginKind

PROMOTING_ORIGINS = WEIGHT_ORIGINS | {OriginKind.CONSTANT}
INTENDED_WIDE_OPS = 4  # a promoted stretch this short that ends in casts back is a deliberate float32 step


def widened_ops(graph: DtypeGraph, start: str, dtype: str) -> tuple[int, bool, bool]:
    """How many ops after ``start`` go on producing ``dtype`` from its output, up to an explicit cast,
    whether every such value ends in explicit casts (back to the stream's dtype, as RoPE in float32 does),
    and whether the forward returns one of them."""
    seen, frontier, cast_back, returned = set(), list(graph.outputs(start)), True, False
    while frontier:
        tensor = frontier.pop()
        returned = returned or bool(graph.tensor(tensor).get("returned"))
        consumers = graph.consumers(tensor)
        cast_back = cast_back and bool(consumers)
        for op in consumers:
            if op in seen or graph.op_is(op, OpKind.CAST):
                continue
            outputs = [t for t in graph.outputs(op) if graph.tensor(t)["dtype"] == dtype]
            if outputs:
                seen.add(op)
                frontier += outputs
            else:
                cast_back = False
    return len(seen), cast_back, returned


class Promotion(Rule):
    """
    ## What it does
    Finds a floating leaf (buffer, parameter, tensor attribute or a constant made in forward) of a wider
    dtype than the compute dtype that silently promotes the activation stream, following torch's own type
    promotion: the op's recorded output dtype, as `torch.result_type` decided it. Where no leaf is behind
    it (an activation cast to float32 on purpose, a router's `scores.float()`, that meets the stream again
    without a cast back, up to the model's output), it names the op and module where the stream leaves the
    compute dtype.

    ## Why is this bad?
    `x_fp16 * buffer_fp32` is legal and returns float32: every op after it runs in float32, at twice
    the memory and bandwidth, until something fails further on (`mat1 and mat2 must have the same
    dtype` in the next linear, or a fused kernel's dtype assert). The root cause sits far upstream.

    ## Example
    ```python
    self.register_buffer("scale", torch.ones(hidden))   # float32, and model.half() was never called
    ...
    return x * self.scale                               # float16 in, float32 out
    ```

    Use instead: register the buffer in the model's dtype, or cast the product back (`.to(x.dtype)`).

    ## Fix safety
    The fix casts the buffer or parameter to the compute dtype. It is unsafe: the ops after it then
    compute in the narrower dtype, which changes their results beyond rounding of the leaf.

    ## Known problems
    A 0-dim tensor does not promote a dimensioned one (torch's rule), so scalars are never reported.
    Tensors the backend keeps in float32 by design (`intended-fp32` of its pack) are skipped.

    ## References
    - https://pytorch.org/docs/stable/tensor_attributes.html#type-promotion-doc
    """

    code = "DT102"
    name = "promotion"
    severity = Severity.WARNING
    fix_availability = "sometimes"

    def check(self, context: RuleContext) -> Iterator[Finding]:
        graph, compute = context.graph, context.compute_dtype
        compute_name = dtype_name(compute)
        reported: set[str] = set()  # promoting leaves, and the casts that made a promoting stream value
        for op in graph.ops():
            outputs = graph.outputs(op)
            if graph.op_is(op, OpKind.CAST) or graph.op(op)["inplace"] or not outputs:
                continue  # casts are explicit; an in-place op keeps its target's dtype
            self.looked(context)
            if not wider(graph.dtype(outputs[0]), compute):
                continue
            inputs = graph.floating_inputs(op)
            if not any(
                graph.tensor(tensor)["dtype"] == compute_name and graph.tensor(graph.source(tensor))["origin"] in STREAM_ORIGINS
                for tensor in inputs
            ):
                continue  # no activation entered in the compute dtype: nothing was promoted here
            wide = graph.tensor(outputs[0])["dtype"]
            for tensor in inputs:
                # The input made the difference: torch promotes the compute dtype with it to the output's
                # (float32 itself, or float16 meeting bfloat16, which also gives float32).
                if graph.tensor(tensor)["dtype"] == compute_name:
                    continue
                if dtype_name(torch.promote_types(compute, graph.dtype(tensor))) != wide:
                    continue
                leaf = self._promoting_leaf(context, tensor)
                if leaf is None:
                    casts = graph.lineage(tensor).casts
                    if casts and casts[0] not in reported:  # the stream itself, made wide on purpose
                        reported.add(casts[0])
                        yield from self._stream_left(context, op, tensor, casts[0], wide, compute_name)
                    continue
                if leaf in reported:
                    continue
                reported.add(leaf)
                yield self._finding(context, op, tensor, leaf, wide, compute_name)

    def _stream_left(self, context: RuleContext, op: str, tensor: str, cast: str, wide: str,
                     compute: str) -> Iterator[Finding]:
        """An activation cast wide on purpose (a router's ``scores.float()``) that meets the stream without a
        cast back: the stream leaves the compute dtype here and the model's output stays wide."""
        graph = context.graph
        after, _, returned = widened_ops(graph, op, wide)
        if not returned:
            return  # cast back, or ending in indices or a mask (a router, a RoPE step, a top-k): a local step
        data, made = graph.op(op), graph.op(cast)
        yield self.finding(
            location=data["module"],
            op=data["name"],
            dtypes=sorted({compute, wide}),
            message=f"the {compute} stream leaves {compute} at {data['name']} in {data['module'] or '<model>'}: "
            f"{graph.describe_derived(tensor)} (cast to {wide} by {made['name']} in {made['module'] or '<model>'}) "
            f"meets it without a cast back; {after} later op{'s' if after != 1 else ''} run in {wide}, and the model "
            f"returns {wide}",
            node=op,
        )

    @staticmethod
    def _promoting_leaf(context: RuleContext, tensor: str) -> str | None:
        """The leaf a promoting input is (through views and copies), or the root a derived table is
        computed from (a RoPE table from ``inv_freq``, a mask from ``attention_mask``). None for the stream
        itself and for a leaf the backend keeps in float32 by design: a table derived from such a leaf is
        still reported, as transformers casts cos/sin before they meet q/k."""
        graph = context.graph
        leaf = graph.source(tensor, through_copies=True)
        if graph.tensor(leaf)["origin"] in PROMOTING_ORIGINS:
            name = graph.leaf_name(leaf)
            return None if name and context.pack.keeps_fp32(name) else leaf
        roots = graph.root_leaves(tensor) if graph.lineage(tensor).table else []
        return roots[0] if roots else None  # a stream value promoted earlier is reported there, not again

    def _finding(self, context: RuleContext, op: str, tensor: str, leaf: str, wide: str, compute: str) -> Finding:
        graph = context.graph
        data, leaf_data = graph.op(op), graph.tensor(leaf)
        name = graph.leaf_name(leaf)
        direct = graph.source(tensor, through_copies=True) == leaf
        # A derived table is fixed by a cast after its derivation, in the model's code: no automatic fix.
        fixable = direct and leaf_data["origin"] in CASTABLE_ORIGINS
        fix = Fix((name,), compute, Applicability.UNSAFE, f"cast {name} to {compute}") if name and fixable else None
        after, cast_back, _ = widened_ops(graph, op, wide)
        what = f"{graph.describe(leaf)} ({leaf_data['dtype']})" if direct else graph.describe_derived(tensor)
        # A table the backend keeps in float32 by design (RoPE's cos/sin from inv_freq), used in float32 for a
        # few ops and cast back: the model computes that step in float32 on purpose (Olmo's rotary).
        # So is a promotion the model's code casts straight back (diffusers' PatchEmbed:
        # ``(latent + pos_embed).to(latent.dtype)``): one op in float32, nothing leaves the stream. And a
        # constant the forward makes in the default dtype, cast back after a few ops (diffusers' AlphaBlender:
        # ``torch.where(..., torch.ones(1, 1), ...)``, reshaped, then ``.to(x.dtype)``).
        short = after <= INTENDED_WIDE_OPS
        intended = cast_back and ((name is not None and context.pack.keeps_fp32(name) and short) or after == 0
                                  or (leaf_data["origin"] == OriginKind.CONSTANT and short))
        ending = "; then cast back: an intended float32 step" if intended else ""
        return self.finding(
            location=data["module"],
            tensor=name or graph.blamed_leaf(tensor),  # a constant the forward stored: named by its buffer
            op=data["name"],
            dtypes=sorted({compute, wide, graph.tensor(tensor)["dtype"]}),
            message=f"{what} promotes the {compute} stream to {wide} at {data['name']}; "
            f"{after} later op{'s' if after != 1 else ''} then run in {wide}{ending}",
            fix=None if intended else fix,
            node=op,
            severity=Severity.INFO if intended else None,
        )
