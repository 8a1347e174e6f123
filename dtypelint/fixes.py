"""The last stage, besides the report: apply the findings' fixes to the model, verified and measured.

``fix`` casts exactly the parameters and buffers that findings name, in place, re-audits with the same
inputs, and rolls everything back (bit-identical) when a fixed finding remains or a new error appears.
What it planned and did are the records of ``dtypelint.plan``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch

from dtypelint.diagnostics import ISLAND_CODE, Applicability, Severity
from dtypelint.dtypes import dtype_name, parse_dtype
from dtypelint.errors import UsageError
from dtypelint.paths import local_path, parse_file, shown
from dtypelint.plan import Change, FixPlan, FixResult, IslandPlan
from dtypelint.report import Report
from dtypelint.rope import rope_error
from dtypelint.vocabulary import OriginKind

if TYPE_CHECKING:
    from dtypelint.advisor import Islands, PrecisionPlan


def plan_fixes(report: Report, *, unsafe: bool = False) -> FixPlan:
    """The casts the report's findings propose: safe ones, and unsafe ones too when ``unsafe``."""
    tensors = report.tensor_dtypes
    changes: dict[str, Change] = {}
    for finding in report.findings:
        fix = finding.fix
        if fix is None or (fix.safety == Applicability.UNSAFE and not unsafe):
            continue
        for name in fix.tensors:
            if name not in changes:
                changes[name] = Change(name, tensors.get(name, "?"), fix.to_dtype, finding.code, finding.message,
                                       fix.safety)
    return FixPlan(report.model, list(changes.values()))


def _locate(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str, OriginKind] | None:
    module_name, _, attribute = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    if attribute in module._parameters and module._parameters[attribute] is not None:
        return module, attribute, OriginKind.PARAMETER
    if attribute in module._buffers and module._buffers[attribute] is not None:
        return module, attribute, OriginKind.BUFFER
    return None


class _Transaction:
    """Casts that can be undone exactly: buffers get their original tensor object back, parameters
    their original data (the Parameter object itself never changes, so optimizers and ties hold)."""

    def __init__(self) -> None:
        self._undo: list[Any] = []

    def cast(self, model: torch.nn.Module, change: Change) -> None:
        module, attribute, kind = _locate(model, change.tensor)  # type: ignore[misc]
        dtype = parse_dtype(change.to_dtype)
        if kind == OriginKind.PARAMETER:
            parameter = module._parameters[attribute]
            if parameter.dtype == dtype:
                return  # tied to a tensor cast before
            original = parameter.data
            parameter.data = original.to(dtype)
            self._undo.append(lambda: setattr(parameter, "data", original))
        else:
            original = module._buffers[attribute]
            if original.dtype == dtype:
                return
            module._buffers[attribute] = original.to(dtype)
            self._undo.append(lambda: module._buffers.__setitem__(attribute, original))

    def islands(self, model: torch.nn.Module, islands: IslandPlan) -> None:
        from dtypelint.advisor import apply_islands

        self._undo.append(apply_islands(model, islands.modules, dtype=parse_dtype(islands.dtype)).remove)

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


def _plan_islands(model: torch.nn.Module, inputs: Any, report: Report, result: FixResult) -> None:
    """DT103's unsafe fix: the modules ``dtypelint.advisor`` finds must stay float32 for the report's
    compute dtype, verified there, as islands (their tensors cast to float32: the plan's changes)."""
    from dtypelint.advisor import LOW_DTYPES, precision

    low = parse_dtype(report.compute_dtype)
    if low not in LOW_DTYPES or not any(finding.code == ISLAND_CODE for finding in report.findings):
        return
    found = result.precision = precision(model, inputs, low)
    if not found.keep or found.recommend != found.dtype:
        result.remarks.append(f"{ISLAND_CODE}: no float32 modules make {found.dtype} work; deploy in {found.recommend} "
                              f"(`dtypelint precision` shows why)")
        return
    reason = (f"kept in float32 by the verified precision plan (output error {found.error['all']:.3g} all in "
              f"{found.dtype}, {found.error['plan']:.3g} with it)")
    named = {}
    for module_name in found.keep:
        for name, tensor in [*model.get_submodule(module_name).named_parameters(),
                             *model.get_submodule(module_name).named_buffers()]:
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                named.setdefault(f"{module_name}.{name}", Change(f"{module_name}.{name}", dtype_name(tensor.dtype),
                                                                  "float32", ISLAND_CODE, reason, "unsafe"))
    result.plan.changes += [change for name, change in named.items()
                            if name not in {existing.tensor for existing in result.plan.changes}]
    result.plan.islands = IslandPlan(found.dtype, list(found.keep))
    result.remarks.append(f"{ISLAND_CODE}: {', '.join(found.keep)} run as float32 islands (inputs cast to float32, "
                          f"outputs back to {found.dtype}); after every load, apply the plan (dtypelint.apply_plan): it casts "
                          f"the islands to float32, the rest to {found.dtype}, and adds the casts around them")


def _check_plan(model: torch.nn.Module, plan: FixPlan) -> None:
    plan.validate()
    missing = [change.tensor for change in plan.changes if _locate(model, change.tensor) is None]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UsageError(f"the fix plan names {len(missing)} tensor(s) the model lacks: "
                         f"{', '.join(map(shown, missing[:3]))}{more}")
    for change in plan.changes:
        module, attribute, _ = _locate(model, change.tensor)  # type: ignore[misc]
        current = dtype_name(getattr(module, attribute).dtype)
        if change.from_dtype not in ("?", current) and current != change.to_dtype:
            raise UsageError(f"{change.tensor} is {current}, the plan expects {change.from_dtype}")


@overload
def apply_plan(model: torch.nn.Module, plan: FixPlan) -> list[Change]: ...
@overload
def apply_plan(model: torch.nn.Module, plan: PrecisionPlan) -> Islands: ...
@overload
def apply_plan(model: torch.nn.Module, plan: str | Path) -> list[Change] | Islands: ...


def apply_plan(model: torch.nn.Module, plan: FixPlan | PrecisionPlan | str | Path) -> list[Change] | Islands:
    """Apply a plan (object or JSON path) to a model, all or nothing. A fix plan returns the casts made; a
    precision plan (``dtypelint.advisor``) casts the model to its recommended dtype with its kept modules
    as float32 islands and returns the handle whose ``remove()`` undoes that."""
    from dtypelint.advisor import PrecisionPlan, apply_precision, is_precision_plan

    if isinstance(plan, (str, Path)):
        plan = PrecisionPlan.read(plan) if is_precision_plan(parse_file(local_path(plan), json.loads, "JSON")) \
            else FixPlan.read(plan)
    if isinstance(plan, PrecisionPlan):
        return apply_precision(model, plan)
    _check_plan(model, plan)
    transaction = _Transaction()
    try:
        for change in plan.changes:
            transaction.cast(model, change)
        if plan.islands is not None:
            transaction.islands(model, plan.islands)
    except BaseException:
        transaction.rollback()
        raise
    return plan.changes


def _outputs(model: torch.nn.Module, inputs: Any) -> torch.Tensor | None:
    """The forward's first output as float32, on fresh copies of the inputs (so a forward that writes them
    in place sees the same values each time), with the model and global state restored afterwards."""
    from dtypelint.forward import first_tensor, run_forward

    ran = run_forward(model, inputs)  # an unfixed model may not run: its change is then unmeasurable
    output = None if ran.error is not None else first_tensor(ran.output)
    return None if output is None else output.detach().float().clone()


def _difference(reference: torch.Tensor | None, other: torch.Tensor | None) -> tuple[float, float] | None:
    if reference is None or other is None or reference.shape != other.shape:
        return None
    absolute = (other - reference).abs()
    relative = absolute / reference.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return absolute.max().item(), relative.max().item()


def _is_new_error(finding: Any, before: set[tuple]) -> bool:
    return finding.severity == Severity.ERROR and (finding.code, finding.location, finding.tensor) not in before


def fix(
    model: torch.nn.Module,
    report: Report | None = None,
    *,
    inputs: Any = None,
    unsafe: bool = False,
    dry_run: bool = False,
    **audit_options: Any,
) -> FixResult:
    """Apply the fixes of ``report`` (audited from ``inputs`` first when None) to ``model`` in place.

    Safe fixes only, unless ``unsafe``. After applying, the model is re-audited as the report was
    (``report.rerun``: its inputs, backend, packs, selection and compute dtype; ``inputs`` and
    ``audit_options`` override them): every fixed finding must be gone and no new error may appear,
    otherwise every cast is rolled back and the result says why. ``dry_run`` plans without changing
    anything.
    """
    from dtypelint.pipeline import audit

    if report is not None and report.mode != "value":
        raise UsageError(f"a {report.mode}-mode report has no real weights to fix; audit in value mode")
    if inputs is None and report is not None and report.rerun is not None:
        inputs = report.rerun.inputs
    if inputs is None:
        raise UsageError("fix needs the inputs to verify with: pass inputs=, or a report made by audit()")
    before = report if report is not None else audit(model, inputs, **audit_options)
    audit_again = before.rerun.audit if before.rerun is not None else functools.partial(audit, dtype=before.compute_dtype)
    plan = plan_fixes(before, unsafe=unsafe)
    result = FixResult(plan=plan, applied=False, before=before)
    if unsafe:
        _plan_islands(model, inputs, before, result)
    if dry_run or not plan.changes:
        return result
    _check_plan(model, plan)
    read = {before.graph.tensor(node)["name"] for node in before.graph.tensors()}
    result.unread = [change.tensor for change in plan.changes if change.tensor not in read]
    reference = _outputs(model, inputs)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 4096
    for change in plan.changes:
        if change.tensor.endswith("inv_freq") or change.tensor.endswith("inv_freq_scaled"):
            module, attribute, _ = _locate(model, change.tensor)  # type: ignore[misc]
            result.rope_error[change.tensor] = rope_error(getattr(module, attribute), parse_dtype(change.to_dtype), positions)
    transaction = _Transaction()
    try:
        for code in dict.fromkeys(change.code for change in plan.changes):
            for change in plan.changes:
                if change.code == code:
                    transaction.cast(model, change)
            if code == ISLAND_CODE and plan.islands is not None:
                transaction.islands(model, plan.islands)
            result.output_change[code] = _difference(reference, _outputs(model, inputs))
        result.applied = True
        result.after = audit_again(model, inputs, **audit_options)
    except BaseException:
        transaction.rollback()
        raise
    fixed = {(change.code, change.tensor) for change in plan.changes}
    remaining = [f for f in result.after.findings if (f.code, f.tensor) in fixed
                 or (plan.islands is not None and f.code == ISLAND_CODE)]
    errors_before = {(f.code, f.location, f.tensor) for f in before.findings if f.severity == Severity.ERROR}
    new_errors = [f for f in result.after.findings if _is_new_error(f, errors_before)]
    if remaining or new_errors:
        transaction.rollback()
        result.rolled_back = True
        culprit = (remaining or new_errors)[0]
        result.reason = (
            f"{culprit.code} still reported for {culprit.tensor}" if remaining
            else f"the fix introduced {culprit.code} at {culprit.location or '<model>'}: {culprit.message}"
        )
    return result
