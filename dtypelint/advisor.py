"""The precision advisor: which modules must stay float32 for a model to run in float16 or bfloat16.

``precision(model, inputs, dtype)`` answers with module names, verified. It runs a float32 reference, then
the model all in ``dtype``. Past the tolerance, it searches for the fewest modules to keep in float32, as
islands (float32 parameters, floating inputs cast to float32, floating outputs cast back to ``dtype``): a
bisection over the model's blocks in execution order, then over the children of each block it kept, so
the forwards grow with the logarithm of the depth. A last run verifies the plan; with a ``backend``, an
audit of the planned model against that backend's kernel contracts verifies it there too. Where no plan
within ``max_keep`` works (the residual stream between the blocks itself overflows float16), it
recommends the dtype that a verified run shows to work.

The user's model is never changed. The trials run on one working copy that shares the model's structure
but not its weights: its tensors in ``dtype`` are made once, and a kept module gets the model's own float32
tensors (or a float32 copy of them). Every forward runs through ``forward.run_forward``, which restores
whatever it changed.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from dtypelint.dtypes import dtype_name, parse_dtype
from dtypelint.errors import LoadError, UsageError, first_line
from dtypelint.forward import first_tensor, output_kind, prepare_call, run_forward
from dtypelint.paths import local_path, parse_file, shown, write_file

LOW_DTYPES = (torch.float16, torch.bfloat16)
REFERENCE_DTYPES = (torch.float32, torch.float64)
# The output error a dtype may cost by default, per output kind: measured on random-init transformers
# models (2-8 layers, 64 wide), whose error all in float16 is 2-4e-3 and all in bfloat16 1-3e-2.
DEFAULT_TOLERANCE: dict[str, dict[torch.dtype, float]] = {
    "logits": {torch.float16: 1e-2, torch.bfloat16: 6e-2},
    "hidden states": {torch.float16: 1e-2, torch.bfloat16: 6e-2},
    "image": {torch.float16: 5e-3, torch.bfloat16: 3e-2},
}
ERROR_MEASURE = "max |output - reference| / max |reference|"
# A float32 activation past this share of the target dtype's largest value is forecast to overflow there
# (the next matmul or residual add doubles it easily).
FORECAST_FRACTION = 0.5
PLAN_KIND = "dtypelint precision plan"
PLAN_VERSION = 1


@dataclass
class PrecisionPlan:
    """What ``precision`` found.

    ``recommend``: the dtype to deploy (``dtype``, or the one a verified run shows to work when no plan
    does); ``keep``: the modules to keep in float32 (minimal, verified); ``forwards``: every forward it ran,
    the reference included; ``error``: the output error against the reference with everything in ``dtype``
    (``all``), with the plan (``plan``) and, where tried, in another dtype (by its name); ``forecast``: what
    the reference run alone predicts to overflow; ``modules``: per block, the error of its output with
    everything in ``dtype``, how much it grew there, the largest value of its float32 output, and whether
    it is where the error first passes the tolerance (``enters``)."""

    model: str
    dtype: str
    recommend: str
    keep: list[str]
    forwards: int
    error: dict[str, float | None]
    tolerance: float
    output: str = "hidden states"
    measure: str = ERROR_MEASURE
    backend: str | None = None
    forecast: list[dict[str, Any]] = field(default_factory=list)
    modules: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fine_as_is(self) -> bool:
        """The asked dtype works with nothing kept in float32."""
        return self.recommend == self.dtype and not self.keep

    def keep_in_fp32_modules(self) -> list[str]:
        """The plan as transformers' ``_keep_in_fp32_modules``: the kept modules' own names, which transformers
        matches against every module path (``wo`` keeps every ``...wo``)."""
        return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in self.keep))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": PLAN_KIND, "version": PLAN_VERSION, "model": self.model, "dtype": self.dtype,
            "recommend": self.recommend, "keep": list(self.keep), "forwards": self.forwards,
            "error": dict(self.error), "tolerance": self.tolerance, "output": self.output, "measure": self.measure,
            "backend": self.backend, "forecast": list(self.forecast), "modules": list(self.modules),
            "keep_in_fp32_modules": self.keep_in_fp32_modules(), "notes": list(self.notes),
        }

    def write(self, path: str | Path, *, sources: Sequence[str | Path] = ()) -> Path:
        """Write the plan as JSON, never on, in or around ``sources`` (checkpoints)."""
        text = json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False)
        return write_file("the precision plan", path, text + "\n", sources)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrecisionPlan:
        if data.get("kind") != PLAN_KIND or data.get("version") != PLAN_VERSION:
            raise ValueError(f"not a version {PLAN_VERSION} precision plan")
        keep = data.get("keep")
        if not isinstance(keep, list) or not all(isinstance(name, str) for name in keep):
            raise ValueError("'keep' must be a list of module names")
        low = parse_dtype(str(data.get("recommend")))
        if low not in (*LOW_DTYPES, *REFERENCE_DTYPES):
            raise ValueError(f"'recommend' must be a floating dtype, not {data.get('recommend')!r}")
        fields = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        error = {key: None if value is None else float(value) for key, value in dict(data.get("error") or {}).items()}
        return cls(**{**fields, "keep": list(keep), "error": error})

    @classmethod
    def read(cls, path: str | Path) -> PrecisionPlan:
        data = parse_file(local_path(path), json.loads, "JSON")
        try:
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            return cls.from_dict(data)
        except (ValueError, TypeError) as error:
            raise LoadError(f"precision plan {shown(path)} is malformed: {first_line(error)}") from None


def json_safe(value: Any) -> Any:
    """JSON has no inf: an infinite error is the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def is_precision_plan(data: Any) -> bool:
    return isinstance(data, Mapping) and data.get("kind") == PLAN_KIND


def precision(
    model: nn.Module,
    inputs: Any,
    dtype: torch.dtype | str = torch.float16,
    *,
    tolerance: float | None = None,
    reference: torch.dtype | str = torch.float32,
    backend: str | Sequence[str] | None = None,
    max_keep: int | None = None,
    attn_implementation: str | None = None,
    inputs_dtype: torch.dtype | str | None = None,
) -> PrecisionPlan:
    """Which modules of ``model`` must stay float32 for it to run in ``dtype`` within ``tolerance`` of a
    ``reference`` run (see the module docs). ``inputs`` as ``dtypelint.audit`` takes them; their floating
    tensors are cast to the dtype of each run. ``tolerance``: the largest output error accepted (default:
    per output kind and dtype, ``DEFAULT_TOLERANCE``). ``backend``: a rule pack (or packs) the planned model
    is audited against. ``max_keep``: the most modules a plan may keep (default: no bound); past it,
    another dtype is recommended. ``attn_implementation``: the attention the deployment runs (as ``audit``
    takes it). ``inputs_dtype``: the dtype of the floating inputs of the low-dtype runs (default: that
    dtype, as a pipeline casts them). The model is left exactly as it was."""
    low = parse_dtype(dtype)
    if low not in LOW_DTYPES:
        raise UsageError(f"precision plans a float16 or bfloat16 deployment, not {dtype_name(low)}")
    high = parse_dtype(reference)
    if high not in REFERENCE_DTYPES:
        raise UsageError(f"the reference must be float32 or float64, not {dtype_name(high)}")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not 0 < tolerance < math.inf):
        raise UsageError(f"tolerance must be a positive number, not {tolerance!r}")
    if max_keep is not None and (isinstance(max_keep, bool) or not isinstance(max_keep, int) or max_keep < 1):
        raise UsageError(f"max_keep must be a positive integer, not {max_keep!r}")
    prepare_call(model, inputs)  # refuses inputs it cannot call with, before anything is copied
    if any(tensor.device.type == "meta" for tensor in [*model.parameters(), *model.buffers()]):
        raise UsageError("precision needs real weights: the model has tensors on the meta device")
    search = _Search(model, inputs, low, high, attn_implementation, parse_dtype(inputs_dtype))
    return search.run(tolerance, backend, max_keep)


@contextmanager
def keep_in_float32(model: nn.Module, keep: Iterable[str] | PrecisionPlan) -> Iterator[nn.Module]:
    """Run ``model`` (in float16 or bfloat16) with the modules ``keep`` as float32 islands, and put it back
    exactly afterwards: their tensors are cast to float32 and hooks cast their floating inputs to float32 and
    their floating outputs back to the dtype their input had."""
    handles = apply_islands(model, keep)
    try:
        yield model
    finally:
        handles.remove()


def apply_precision(model: nn.Module, plan: PrecisionPlan) -> Islands:
    """Run ``model`` as ``plan`` says, in place: in the recommended dtype, with its kept modules as float32
    islands; ``.remove()`` on the result puts the model back exactly."""
    return apply_islands(model, plan.keep, dtype=parse_dtype(plan.recommend))


class Islands:
    """What ``apply_islands`` did to a model, undone by ``remove()``: the hooks, and each cast tensor's
    original data."""

    def __init__(self) -> None:
        self.hooks: list[Any] = []
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []

    def remove(self) -> None:
        for handle in self.hooks:
            handle.remove()
        for tensor, data in reversed(self.tensors):
            tensor.data = data
        self.hooks, self.tensors = [], []


def apply_islands(model: nn.Module, keep: Iterable[str] | PrecisionPlan, *, dtype: torch.dtype | None = None) -> Islands:
    """Make the modules ``keep`` float32 islands of ``model`` in place (see ``keep_in_float32``), after
    casting the other floating parameters and persistent buffers to ``dtype`` (default: leave them; a
    non-persistent buffer such as ``inv_freq`` keeps its dtype, as ``from_pretrained(dtype=...)`` leaves
    it); ``.remove()`` on the result undoes both."""
    names = list(keep.keep if isinstance(keep, PrecisionPlan) else keep)
    missing = [name for name in names if not _has_submodule(model, name)]
    if missing:
        raise UsageError(f"the plan keeps {len(missing)} module(s) the model lacks: {', '.join(map(shown, missing[:3]))}")
    outermost = [model.get_submodule(name) for name in _outermost(names)]
    targets = {id(tensor): (tensor, torch.float32) for module in outermost
               for tensor in [*module.parameters(), *module.buffers()] if tensor.is_floating_point()}
    if dtype is not None:  # the rest; an island's tensors go to float32 from what they are, not via dtype
        as_built = _non_persistent(model)
        for name, tensor in _named_tensors(model).items():
            if name not in as_built:
                targets.setdefault(id(tensor), (tensor, dtype))
    islands = Islands()
    try:
        for tensor, target in targets.values():
            if tensor.dtype != target:
                islands.tensors.append((tensor, tensor.data))
                tensor.data = tensor.data.to(target)
        for module in outermost:
            islands.hooks += _island_hooks(module, torch.float32)
    except BaseException:
        islands.remove()
        raise
    return islands


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _outermost(names: Sequence[str]) -> list[str]:
    return [name for name in names if not any(name.startswith(f"{other}.") for other in names if other != name)]


def _island_hooks(module: nn.Module, dtype: torch.dtype, back: torch.dtype | None = None) -> list[Any]:
    """Hooks that run ``module`` in ``dtype``: its floating inputs cast to it, its floating outputs cast back
    to ``back`` (default: the dtype of its first floating input)."""
    entered: list[torch.dtype | None] = []

    def cast_inputs(_: nn.Module, args: Any, kwargs: Any) -> Any:
        floating = _floating((args, kwargs))
        entered.append(back or (floating[0].dtype if floating else None))
        return _cast_floating((args, kwargs), dtype)

    def cast_outputs(_: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        target = entered.pop() if entered else back
        return output if target is None else _cast_floating(output, target)

    return [module.register_forward_pre_hook(cast_inputs, with_kwargs=True),
            module.register_forward_hook(cast_outputs, with_kwargs=True, always_call=True)]


class _Search:
    """The trials of one plan, on one working copy of the model."""

    def __init__(self, model: nn.Module, inputs: Any, low: torch.dtype, high: torch.dtype,
                 attn_implementation: str | None, inputs_dtype: torch.dtype | None) -> None:
        self.source, self.inputs, self.low, self.high = model, inputs, low, high
        self.attn_implementation, self.inputs_dtype = attn_implementation, inputs_dtype
        self.work = _structure_copy(model)
        self.names = {id(module): name for name, module in self.work.named_modules()}
        self.forwards = 0
        self.order: list[str] = []  # modules in the order their forwards started, in the reference run
        self.reference: torch.Tensor | None = None
        self.kind = "hidden states"
        self.tolerance, self.tolerance_given = math.inf, False
        self.errors: dict[tuple[str, ...], float | None] = {}
        # Every floating tensor of the model, by each of its names (ties share one entry).
        self.tensors = _named_tensors(model)
        self.work_tensors = _named_tensors(self.work)
        self._make_low_data(low)

    def _make_low_data(self, dtype: torch.dtype) -> None:
        """The model's floating tensors in ``dtype``, each made once (a tied weight too); non-persistent
        buffers keep their dtype, as a checkpoint loaded in ``dtype`` has them."""
        made: dict[int, torch.Tensor] = {}
        as_built = _non_persistent(self.source)
        for name, tensor in self.tensors.items():
            if id(tensor) not in made:
                made[id(tensor)] = tensor.detach().clone() if name in as_built else tensor.detach().to(dtype, copy=True)
        self.low_data = {name: made[id(tensor)] for name, tensor in self.tensors.items()}

    # Trials ------------------------------------------------------------------------------------------

    def run(self, tolerance: float | None, backend: str | Sequence[str] | None, max_keep: int | None) -> PrecisionPlan:
        peaks = self._reference()
        kind = self.kind
        self.tolerance_given = tolerance is not None
        self.tolerance = DEFAULT_TOLERANCE[kind][self.low] if tolerance is None else float(tolerance)
        all_low, modules = self._all_low(peaks)
        plan = PrecisionPlan(model=type(self.source).__name__, dtype=dtype_name(self.low),
                             recommend=dtype_name(self.low), keep=[], forwards=0,
                             error={"all": all_low, "plan": all_low}, tolerance=self.tolerance, output=kind,
                             backend=_backend_name(backend), forecast=self._forecast(peaks), modules=modules)
        if not self._passes(all_low):
            self._plan(plan, max_keep)
        if plan.keep and backend is not None and (refused := self._refused_on_backend(plan.keep, backend)):
            plan.notes += [f"on {plan.backend}, the plan meets {finding.code} at {finding.location}: {finding.message}"
                           for finding in refused]
            plan.keep, plan.error["plan"] = [], None
            plan.recommend = self._another_dtype(plan, f"the float32 islands break a kernel contract of {plan.backend}")
        plan.forwards = self.forwards
        return plan

    def _plan(self, plan: PrecisionPlan, max_keep: int | None) -> None:
        keep = self._minimal(self._blocks(), [])
        if keep is not None:
            keep = self._refined(keep)
        if keep is not None and (max_keep is None or len(keep) <= max_keep):
            plan.keep, plan.error["plan"] = keep, self._error(keep)
            if not self._passes(plan.error["plan"]):  # the bisection assumes keeping more never hurts
                plan.notes.append("the plan is past the tolerance: its modules interact; keep their parents instead")
            return
        plan.error["plan"] = None
        if keep is not None:
            plan.notes.append(f"a plan needs {len(keep)} modules in float32, past max_keep={max_keep}")
        plan.recommend = self._another_dtype(
            plan, f"no set of float32 modules makes {dtype_name(self.low)} work: the stream between them is past "
                  f"its range" if keep is None else "the plan is too large for max_keep")

    def _passes(self, error: float | None) -> bool:
        return error is not None and error <= self.tolerance

    def _reference(self) -> dict[str, float]:
        """The reference run: the reference output and kind, the order modules start in, each block's
        output (for the attribution) and each module's largest float activation (the forecast)."""
        self._cast((), self.high)
        peaks: dict[str, float] = {}
        blocks = set(self._block_names())
        self.block_outputs: dict[str, torch.Tensor] = {}

        def record(name: str, output: Any) -> None:
            tensors = [tensor for tensor in _floating(output) if tensor.numel()]
            if tensors:
                peaks[name] = max(peaks.get(name, 0.0), *(float(tensor.detach().abs().max()) for tensor in tensors))
            first = first_tensor(output)
            if name in blocks and first is not None and first.is_floating_point() and name not in self.block_outputs:
                self.block_outputs[name] = first.detach().float().clone()

        with self._observed(record, started=lambda name: self.order.append(name) if name not in self.order else None):
            ran = self._forward(self.high)
        if ran.error is not None or first_tensor(ran.output) is None:
            why = f"raised {type(ran.error).__name__}: {first_line(ran.error)}" if ran.error else "returned no tensor"
            raise UsageError(f"the model's forward in {dtype_name(self.high)} {why}: nothing to compare with")
        self.kind = output_kind(ran.output)
        self.reference = first_tensor(ran.output).detach().float().clone()
        return peaks

    def _all_low(self, peaks: dict[str, float]) -> tuple[float | None, list[dict[str, Any]]]:
        """The error with everything in the low dtype, and per block the error of its output there."""
        self._cast((), self.low)
        blocks = set(self._blocks())
        errors: dict[str, float] = {}

        def record(name: str, output: Any) -> None:
            first = first_tensor(output)
            if name in blocks and name in self.block_outputs and first is not None and name not in errors:
                errors[name] = _relative_error(first.detach().float(), self.block_outputs[name])

        with self._observed(record):
            error = self._compare(self._forward(self.low))
        self.errors[()] = error
        rows: list[dict[str, Any]] = []
        before = None
        for name in self._in_order(errors):
            value = errors[name]
            grew = value / before if before and math.isfinite(value) else None
            enters = value > self.tolerance and not any(row["enters"] for row in rows)
            rows.append({"module": name, "error": value, "growth": grew, "max_abs": peaks.get(name), "enters": enters})
            if math.isfinite(value):
                before = max(value, before or 0.0)
        del self.block_outputs
        return error, rows

    def _error(self, keep: Sequence[str]) -> float | None:
        key = tuple(sorted(keep))
        if key not in self.errors:
            with self._planned(keep):
                self.errors[key] = self._compare(self._forward(self.low))
        return self.errors[key]

    @contextmanager
    def _planned(self, keep: Sequence[str]) -> Iterator[None]:
        """The working copy in the low dtype with ``keep`` as float32 islands."""
        self._cast(keep, self.low)
        hooks = [hook for name in _outermost(list(keep))
                 for hook in _island_hooks(self.work.get_submodule(name), self.high, back=self.low)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _forward(self, dtype: torch.dtype) -> Any:
        self.forwards += 1
        ran = run_forward(self.work, self._inputs(dtype), attn_implementation=self.attn_implementation)
        if ran.written_parameters:  # a forward that writes its weights would change them for the next trial
            raise UsageError(f"the model's forward writes its parameters in place ({ran.written_parameters[0]}): "
                             "its trials would not be comparable")
        return ran

    def _inputs(self, dtype: torch.dtype) -> Any:
        return _cast_floating(self.inputs, dtype if dtype == self.high or self.inputs_dtype is None else self.inputs_dtype)

    def _compare(self, ran: Any) -> float | None:
        """The output's error against the reference; inf where it is not finite, None where it did not run."""
        output = None if ran.error is not None else first_tensor(ran.output)
        if output is None or self.reference is None or output.shape != self.reference.shape:
            return None
        return _relative_error(output.detach().float(), self.reference)

    # The search ---------------------------------------------------------------------------------------

    def _blocks(self) -> list[str]:
        """The modules the search starts from, in execution order: the model's repeated blocks and the
        modules beside them (``model.embed_tokens``, ``model.layers.0``, ..., ``model.norm``, ``lm_head``)."""
        return self._in_order(self._block_names())

    def _block_names(self) -> list[str]:
        found: list[str] = []

        def expand(name: str, module: nn.Module) -> None:
            children = [(f"{name}.{child}" if name else child, sub) for child, sub in module.named_children()]
            if module is self.work or _is_container(module) or any(_is_container(sub) for _, sub in children):
                for child_name, sub in children:
                    expand(child_name, sub)
            elif _holds_floats(module):
                found.append(name)

        expand("", self.work)
        return found

    def _in_order(self, names: Iterable[str]) -> list[str]:
        rank = {name: index for index, name in enumerate(self.order)}
        return sorted((name for name in set(names) if name in rank), key=rank.__getitem__)

    def _minimal(self, candidates: list[str], fixed: list[str]) -> list[str] | None:
        """The fewest ``candidates`` that, kept with ``fixed``, pass; None where even all of them fail.
        Each needed module is the last of the shortest passing prefix of what is left."""
        if not candidates or not self._passes(self._error([*fixed, *candidates])):
            return None
        needed: list[str] = []
        remaining = list(candidates)
        while not self._passes(self._error([*fixed, *needed])):
            shortest, longest = 1, len(remaining)  # remaining[:longest] with needed passes
            while shortest < longest:
                middle = (shortest + longest) // 2
                if self._passes(self._error([*fixed, *needed, *remaining[:middle]])):
                    longest = middle
                else:
                    shortest = middle + 1
            needed.append(remaining[longest - 1])
            remaining = remaining[: longest - 1]
        return self._in_order(needed)

    def _refined(self, keep: list[str], fixed: Sequence[str] = ()) -> list[str]:
        """Each of ``keep`` (kept with ``fixed``) replaced by the fewest of its children that do as well,
        recursively: a block down to the module inside it that needs float32."""
        refined = list(keep)
        for name in keep:
            children = self._in_order(f"{name}.{child}" for child, sub in self.work.get_submodule(name).named_children()
                                      if _holds_floats(sub))
            others = [*fixed, *(other for other in refined if other != name)]
            inner = self._minimal(children, others) if children else None
            if inner is not None:
                refined = [other for other in refined if other != name] + self._refined(inner, others)
        return self._in_order(refined)

    def _another_dtype(self, plan: PrecisionPlan, why: str) -> str:
        """No plan works in the asked dtype (``why``): the other half dtype if a verified run shows it works,
        else the reference dtype."""
        other = torch.bfloat16 if self.low == torch.float16 else torch.float16
        self._make_low_data(other)
        self._cast((), other)
        error = self._compare(self._forward(other))
        plan.error[dtype_name(other)] = error
        tolerance = self.tolerance if self.tolerance_given else DEFAULT_TOLERANCE[self.kind][other]
        if error is not None and error <= tolerance:
            plan.notes.append(f"{why}; {dtype_name(other)} works, verified (error {error:.3g}, tolerance {tolerance:g})")
            return dtype_name(other)
        plan.notes.append(f"{why}; {dtype_name(other)} does not work either (error {_shown_error(error)}): "
                          f"deploy in {dtype_name(self.high)}")
        return dtype_name(self.high)

    def _refused_on_backend(self, keep: Sequence[str], backend: str | Sequence[str]) -> list[Any]:
        """The error findings inside the islands of an audit of the planned working copy against
        ``backend``: a kernel of the deployment that refuses what an island hands it (a float32 input to a
        half-only kernel)."""
        from dtypelint.diagnostics import Severity
        from dtypelint.pipeline import audit

        with self._planned(keep):
            self.forwards += 1
            report = audit(self.work, self._inputs(self.low), backend=backend, dtype=self.low,
                           attn_implementation=self.attn_implementation)
        return [finding for finding in report.findings if finding.severity == Severity.ERROR and any(
            finding.location == name or finding.location.startswith(f"{name}.") for name in keep)]

    def _forecast(self, peaks: dict[str, float]) -> list[dict[str, Any]]:
        """Modules whose float32 outputs, and tensors whose stored values, are past the target dtype's safe
        range in the reference run."""
        limit = torch.finfo(self.low).max * FORECAST_FRACTION
        rows = [{"module": name, "max_abs": peaks[name], "limit": limit}
                for name in self._in_order(peaks) if name and peaks[name] > limit]
        for name, tensor in self.tensors.items():
            if tensor.numel() and (largest := float(tensor.detach().abs().max())) > torch.finfo(self.low).max:
                rows.append({"tensor": name, "max_abs": largest, "limit": float(torch.finfo(self.low).max)})
        return rows

    # Mechanics ----------------------------------------------------------------------------------------

    def _cast(self, keep: Sequence[str], dtype: torch.dtype) -> None:
        """The working copy's floating tensors: the model's own in the reference dtype inside a kept module
        (or everywhere, when ``dtype`` is the reference), else the ones made in ``dtype``."""
        kept = tuple(f"{name}." for name in keep)
        for name, tensor in self.work_tensors.items():
            if dtype == self.high or name.startswith(kept):
                source = self.tensors[name].detach()
                tensor.data = source if source.dtype == self.high else source.to(self.high)
            else:
                tensor.data = self.low_data[name]

    @contextmanager
    def _observed(self, record: Callable[[str, Any], None],
                  started: Callable[[str], None] | None = None) -> Iterator[None]:
        """``record(name, output)`` after each of the working copy's modules; ``started(name)`` before."""
        handles = []
        for module in self.work.modules():
            name = self.names[id(module)]
            handles.append(module.register_forward_hook(lambda _, args, output, name=name: record(name, output)))
            if started is not None:
                handles.append(module.register_forward_pre_hook(lambda _, args, name=name: started(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _structure_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that allocates no weights: each floating parameter and buffer slot holds an
    empty placeholder of its own (tied weights untied, so a kept module's float32 copy of a tied weight
    leaves its other users in the low dtype), every other tensor (token ids, masks) is the model's own."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for tensor in store.values():
                if tensor is not None:
                    memo[id(tensor)] = tensor if not tensor.is_floating_point() else torch.empty(0, dtype=tensor.dtype)
    work = copy.deepcopy(model, memo)
    for module in work.modules():
        for key, tensor in module._parameters.items():
            if tensor is not None and tensor.is_floating_point():
                module._parameters[key] = nn.Parameter(torch.empty(0, dtype=tensor.dtype), requires_grad=False)
        for key, tensor in module._buffers.items():
            if tensor is not None and tensor.is_floating_point():
                module._buffers[key] = torch.empty(0, dtype=tensor.dtype)
    return work


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    found = dict(model.named_parameters(remove_duplicate=False))
    found.update(model.named_buffers(remove_duplicate=False))
    return {name: tensor for name, tensor in found.items() if tensor.is_floating_point()}


def _non_persistent(model: nn.Module) -> set[str]:
    """The names of the non-persistent buffers (``inv_freq``): a checkpoint loaded in a dtype does not cast
    them (the module makes them at build), so a deployment in that dtype keeps their dtype too."""
    return {f"{name}.{buffer}" if name else buffer for name, module in model.named_modules(remove_duplicate=False)
            for buffer in module._non_persistent_buffers_set}


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential, nn.ModuleDict))


def _holds_floats(module: nn.Module) -> bool:
    return any(tensor.is_floating_point() for tensor in [*module.parameters(), *module.buffers()])


def _backend_name(backend: str | Sequence[str] | None) -> str | None:
    return backend if backend is None or isinstance(backend, str) else ",".join(backend)


def _floating(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map(lambda item: found.append(item) if isinstance(item, torch.Tensor) and item.is_floating_point() else None,
             value)
    return found


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda item: item.to(dtype) if isinstance(item, torch.Tensor) and item.is_floating_point()
                    and item.dtype != dtype else item, value)


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    if output.shape != reference.shape or not torch.isfinite(output).all():
        return math.inf
    scale = float(reference.abs().max()) or 1.0
    return float((output - reference).abs().max()) / scale


def _shown_error(error: float | None) -> str:
    return "did not run" if error is None else f"{error:.3g}"
