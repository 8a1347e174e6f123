"""DT105 param-dtype."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from dtypelint.dtypes import dtype_name
from dtypelint.report import Finding, Fix
from dtypelint.rules.base import Rule, RuleContext
from dtypelint.rules.sites import parent
from dtypelint.vocabulary import OriginKind


class ParamDtype(Rule):
    """
    ## What it does
    Lists floating parameters and buffers whose dtype differs from the compute dtype, one finding per
    module, leaving out the model's `_keep_in_fp32_modules` and the tensors the backend keeps in
    float32 by design (its pack's `intended-fp32`, e.g. RoPE's `inv_freq`).

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
    severity = "warning"
    fix_availability = "always"
    judges_model_only = True

    def check(self, context: RuleContext) -> Iterator[Finding]:
        model, compute = context.model, dtype_name(context.compute_dtype)
        keep = set(model.keep_in_fp32_modules)
        by_module: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for name, info in model.tensors.items():
            if info.kind == OriginKind.ATTRIBUTE or not info.dtype.is_floating_point or dtype_name(info.dtype) == compute:
                continue
            if context.pack.keeps_fp32(name) or keep & set(name.split(".")):
                continue
            by_module[parent(name)].append((name, dtype_name(info.dtype)))
        for module, tensors in by_module.items():
            names = tuple(name for name, _ in tensors)
            listed = ", ".join(f"{name.rsplit('.', 1)[-1]} {dtype}" for name, dtype in tensors)
            yield self.finding(
                location=module,
                tensor=names[0],
                dtypes=sorted({compute, *(dtype for _, dtype in tensors)}),
                message=f"{module or '<model>'} holds {listed} in a {compute} model",
                fix=Fix(names, compute, "unsafe", f"cast {', '.join(names)} to {compute}"),
            )
