"""DT107 intended-fp32."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dtypelint.diagnostics import Finding, Severity
from dtypelint.packs.operands import parent
from dtypelint.packs.schema import BackendPack
from dtypelint.rope import reference_inv_freq, rope_error
from dtypelint.rules.base import Rule, RuleContext
from dtypelint.vocabulary import LEAF_ORIGINS

aten = torch.ops.aten
ANGLE_FUNCTIONS = (aten.cos, aten.sin)
DEFAULT_POSITIONS = 4096  # judged here when the model's config has no max_position_embeddings
HALF = frozenset({torch.float16, torch.bfloat16})


class IntendedFp32(Rule):
    """
    ## What it does
    Checks that computations meant to run in float32 do: the tensors the backend keeps in float32 by
    design (its pack's `intended-fp32`, RoPE's `inv_freq`) must be float32 where the forward reads them,
    and the sin/cos of a table computed from positions and weights alone (rotary angles) must not run in
    float16/bfloat16. Reports the cos/sin error that costs at the model's largest position.

    ## Why is this bad?
    A rotary angle is `position * inv_freq`. `model.to(torch.bfloat16)` also casts the `inv_freq`
    buffer, and bfloat16 keeps 8 significant bits: at position 2000 the angle is off by several radians,
    so cos/sin, and every attention score after them, are wrong for long prompts, silently. Computing the
    angles in half precision (`inv_freq.to(x.dtype)`) does the same.

    ## Example
    ```python
    model = LlamaForCausalLM(config).to(torch.bfloat16)   # inv_freq is bfloat16 now
    ```

    Use instead: `from_pretrained(..., dtype=torch.bfloat16)`, which keeps `inv_freq` in float32, or
    restore it (`model.model.rotary_emb.inv_freq = inv_freq.float()`); compute the angles in float32 and
    cast cos/sin to the activation dtype.

    ## Fix safety
    No automatic fix: the float32 values a cast rounded are gone; recompute them.

    ## Known problems
    A tensor that a kernel contract of the backend reads itself (ipex-llm's rotary kernel takes
    `inv_freq` in the q/k dtype) is left to that contract. The error is measured on a standard RoPE table (base 10000) of the tensor's width at the config's
    `max_position_embeddings` (4096 without one), since the rounded values cannot show what they lost.
    A scaled RoPE loses less. Angles are found by their sin/cos ops, so a kernel that computes sin/cos
    itself is not seen.

    ## References
    - https://github.com/huggingface/transformers/issues/25681
    - https://github.com/huggingface/transformers/pull/29285
    - https://github.com/EleutherAI/gpt-neox/issues/1003
    """

    code = "DT107"
    name = "intended-fp32"
    category = "low-precision-op"
    severity = Severity.WARNING

    def check(self, context: RuleContext) -> Iterator[Finding]:
        reported: set[str] = set()
        for finding in (*self._narrowed_leaves(context), *self._half_angles(context)):
            if finding.location not in reported:
                reported.add(finding.location)
                yield finding

    def _narrowed_leaves(self, context: RuleContext) -> Iterator[Finding]:
        """Intended-float32 tensors the forward read in half precision."""
        graph, positions = context.graph, _positions(context)
        kernel_operands = _kernel_operands(context.pack)
        for node in graph.tensors():
            data = graph.tensor(node)
            if data["origin"] not in LEAF_ORIGINS or not data["name"] or not context.pack.keeps_fp32(data["name"]):
                continue
            self.looked(context)
            if graph.dtype(node) not in HALF or data["name"].rsplit(".", 1)[-1] in kernel_operands:
                continue
            width = 2 * data["shape"][-1] if data["shape"] else 2
            error = _error(graph.dtype(node), width, positions, angles_in_dtype=False)
            yield self.finding(
                location=parent(data["name"]),
                tensor=data["name"],
                dtypes=[data["dtype"]],
                message=f"{graph.describe(node)} is {data['dtype']}, but {context.pack.name} keeps it in "
                f"float32 by design: stored in {data['dtype']}, rotary cos/sin are off by up to {error:.3g} "
                f"at position {positions}",
            )

    def _half_angles(self, context: RuleContext) -> Iterator[Finding]:
        """sin/cos in half precision of a table derived from positions and weights (rotary angles)."""
        graph, positions = context.graph, _positions(context)
        for op in graph.ops():
            if graph.op(op)["packet"] not in ANGLE_FUNCTIONS:
                continue
            self.looked(context)
            inputs = graph.floating_inputs(op)
            # Angles come from positions and weights; sin of a sample's values is an activation (Snake's).
            lineage = graph.lineage(inputs[0]) if inputs else None
            if lineage is None or graph.dtype(inputs[0]) not in HALF or not lineage.table or lineage.data:
                continue
            angles, data = inputs[0], graph.op(op)
            dtype = graph.tensor(angles)["dtype"]
            error = _error(graph.dtype(angles), graph.tensor(angles)["shape"][-1], positions, angles_in_dtype=True)
            roots = graph.root_leaves(angles)
            yield self.finding(
                location=data["module"],
                tensor=graph.leaf_name(roots[0]),
                op=data["name"],
                dtypes=[dtype],
                message=f"{data['name']} runs in {dtype} on angles {graph.describe_derived(angles)} "
                f"(meant for float32): computed in {dtype}, rotary cos/sin are off by up to {error:.3g} at "
                f"position {positions}",
                node=op,
            )


def _kernel_operands(pack: BackendPack) -> frozenset[str]:
    """Attribute names of the buffers and parameters a backend kernel reads itself (``buffer:inv_freq``):
    their dtype is that kernel's contract to decide (ipex-llm's rotary kernel takes the q/k dtype)."""
    return frozenset(
        name
        for contract in pack.contracts
        for selector in contract.tensors
        if selector.startswith(("buffer:", "param:"))
        for name in selector.split(":", 1)[1].split("|")
    )


def _positions(context: RuleContext) -> int:
    positions = context.model.max_positions
    return positions if isinstance(positions, int) and positions > 0 else DEFAULT_POSITIONS


def _error(dtype: torch.dtype, width: int, positions: int, *, angles_in_dtype: bool) -> float:
    return rope_error(reference_inv_freq(max(2, width)), dtype, positions, angles_in_dtype=angles_in_dtype)


