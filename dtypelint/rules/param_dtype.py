"""DT105 param-dtype."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from dtypelint.diagnostics import Applicability, Finding, Fix, Severity
from dtypelint.dtypes import dtype_name
from dtypelint.packs.operands import parent
from dtypelint.rules.base import Rule, RuleContext
from dtypelint.rules.promotion import widened_ops
from dtypelint.vocabulary import OriginKind


class ParamDtype(Rule):
    """
    ## What it does
    Lists floating parameters and buffers whose dtype differs from the compute dtype, one finding per
    module: a warning where one meets another dtype without an explicit cast, an info where the forward
    casts at every use (PEFT's float32 LoRA adapters, vLLM's float32 `cos_sin_cache`) or never reads it.
    The model's `_keep_in_fp32_modules` and the backend's `intended-fp32` tensors (RoPE's `inv_freq`) are
    left out.

    ## Why is this bad?
    A stray float32 weight in a float16 model costs memory and either promotes the stream (`promotion`)
    or breaks a kernel (`mixed-input`, kernel contracts). It usually comes from a layer created after
    the model was cast, or from a loader that casts only what the checkpoint holds.

    ## Example
    `model.half(); model.score = nn.Linear(d, 2)`: `score.weight` and `score.bias` are float32.

    Use instead: create layers before casting, or cast them.

    ## Fix safety
    The fix casts the module's listed tensors to the compute dtype. It is unsafe: ops reading them then
    compute in the compute dtype, which changes results beyond rounding when they ran wider before.
    """

    code = "DT105"
    name = "param-dtype"
    severity = Severity.WARNING
    fix_availability = "always"
    judges_model_only = True

    def check(self, context: RuleContext) -> Iterator[Finding]:
        model, compute = context.model, dtype_name(context.compute_dtype)
        keep = set(model.keep_in_fp32_modules)
        by_module: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for name, info in model.tensors.items():
            if info.kind == OriginKind.ATTRIBUTE or not info.dtype.is_floating_point:
                continue
            self.looked(context)
            if dtype_name(info.dtype) in (compute, dtype_name(model.intended_dtype(name, context.compute_dtype))):
                continue
            if context.pack.keeps_fp32(name) or keep & set(name.split(".")):
                continue
            by_module[parent(name)].append((name, dtype_name(info.dtype)))
        for module, tensors in by_module.items():
            names = tuple(name for name, _ in tensors)
            listed = ", ".join(f"{name.rsplit('.', 1)[-1]} {dtype}" for name, dtype in tensors)
            meeting = next(filter(None, (_uncast_meeting(context, name) for name in names)), None)
            unknown = not context.traced  # --static: no forward, so no use can excuse the dtype
            yield self.finding(
                location=module,
                tensor=names[0],
                dtypes=sorted({compute, *(dtype for _, dtype in tensors)}),
                message=f"{module or '<model>'} holds {listed} in a {compute} model; {_uses(context, names, meeting)}",
                fix=Fix(names, compute, Applicability.UNSAFE, f"cast {', '.join(names)} to {compute}"),
                severity=None if meeting or unknown else Severity.INFO,
            )


def _uses(context: RuleContext, names: tuple[str, ...], meeting: str | None) -> str:
    graph = context.graph
    if not context.traced:
        return "no forward ran, so its uses are unknown"
    if meeting:
        return f"it meets another dtype at {graph.op(meeting)['name']} without a cast"
    if any(graph.leaf_nodes(name) for name in names):
        return "every use casts (an intended convention)"
    return "the forward never reads it"

def _uncast_meeting(context: RuleContext, name: str) -> str | None:
    """Where the tensor first computes next to another dtype without an explicit cast, if anywhere; a
    meeting whose result the model casts straight back (``(latent + pos_embed).to(latent.dtype)``) is the
    model computing one step wide on purpose."""
    graph = context.graph
    for node in graph.leaf_nodes(name):
        meeting = graph.uncast_meeting(node)
        if meeting is None:
            continue
        wide = graph.tensor(graph.outputs(meeting)[0])["dtype"] if graph.outputs(meeting) else None
        after, cast_back, _ = widened_ops(graph, meeting, wide) if wide else (1, False, False)
        if not (cast_back and after == 0):
            return meeting
    return None
