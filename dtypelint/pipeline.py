"""The audit API: load -> trace -> graph -> rules -> report, for a model object or a config."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Unpack

import torch

from dtypelint.autocast import POLICIES, AutocastPolicy
from dtypelint.config import SettingOverrides, Settings
from dtypelint.diagnostics import Finding, Severity
from dtypelint.diffusion import component_class_name
from dtypelint.dtypes import dtype_name, parse_dtype
from dtypelint.errors import UsageError, first_line
from dtypelint.forward import Call, run_forward
from dtypelint.graph import DtypeGraph, no_cyclic_collection
from dtypelint.load import Loaded, Request, config_dtype, load, load_config, stored_dtypes
from dtypelint.model_info import ModelInfo, TensorInfo, config_value, infer_compute_dtype
from dtypelint.paths import local_path
from dtypelint.progress import progress_bar
from dtypelint.report import Report, Rerun
from dtypelint.rules import run_rules
from dtypelint.rules.base import Options, RuleContext
from dtypelint.state import refuse_uninitialised_lazy
from dtypelint.tracer import Tracer, TraceResult, function_mode_dependent, needs_values
from dtypelint.vocabulary import LEAF_ORIGINS, OriginKind


def _unwrap(model: Any, notes: list[str]) -> torch.nn.Module:
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, torch.nn.Module):
        notes.append("torch.compile'd model: audited its eager original (_orig_mod)")
        model = original
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        # Their forward scatters to devices (value mode on CPU just calls .module): audit the module itself.
        notes.append(f"{type(model).__name__}: audited the wrapped module (.module)")
        model = model.module
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(model).__name__}")
    refuse_uninitialised_lazy(model)
    return model


def _written_note(parameters: set[str]) -> list[str]:
    if not parameters:
        return []
    return [f"the forward wrote parameter{'s' if len(parameters) > 1 else ''} {', '.join(sorted(parameters))} "
            "in place; dtypelint cannot undo it"]


@dataclass(frozen=True)
class TraceOptions:
    """How to trace one forward: ``mode`` (value or meta), whether to measure value ``stats``, a progress
    bar, the op limit, the fake mode of a meta-mode load, the attention the deployment runs and whose
    autocast lists apply (``from_settings``: what the settings say)."""

    mode: str = "value"
    stats: bool = False
    progress: bool = False
    max_ops: int | None = None
    fake_mode: Any = None
    attn_implementation: str | None = None
    autocast: str = "cpu"
    steps: int = 1
    go_past: int = 64  # kernels refusing a mix of dtypes the trace goes past, to find the errors behind the first
    compute_dtype: torch.dtype | None = None  # what the operands of a refused kernel are cast to (None: inferred)

    @classmethod
    def from_settings(cls, settings: Settings, **chosen: Any) -> TraceOptions:
        return cls(max_ops=settings.options.max_ops, attn_implementation=settings.attn_implementation,
                   autocast=settings.pack.autocast, steps=settings.options.steps, **chosen)


def _run(model: torch.nn.Module, inputs: Any, options: TraceOptions, notes: list[str]) -> TraceResult:
    """Trace one forward (``dtypelint.forward.run_forward``: the model and process are left as they were,
    the inputs copied, a flash attention run on its stand-in). Exceptions of the forward are kept in the
    result, never raised. Meta mode runs on fake stand-ins of the weights and inputs: shapes and dtypes,
    no data. A forward traced without function-level recording that turns out to need it (a call raised
    before dispatch, autocast turned on inside, a fast path fake tensors cannot run) is traced again with it,
    which is kept if it recorded more or ran through."""
    result = _traced(model, inputs, options, notes)
    reason = result.tracer.wants_function_level or _fakes_stopped_at_a_fast_path(result)
    if reason is None:
        return result
    again = _traced(model, inputs, options, notes, function_level=reason)
    ran_through = result.error is not None and again.error is None
    return again if again.tracer.function_level_recorded or ran_through else result


def _fakes_stopped_at_a_fast_path(result: TraceResult) -> str | None:
    """Fake tensors cannot run every fast path (not the nested tensor ``nn.TransformerEncoder`` makes of a
    padded batch): a meta-mode forward of a model with one that raised is traced again on the general path,
    which a function mode makes it take."""
    tracer = result.tracer
    if result.fake and result.error is not None and tracer.function_level is None and function_mode_dependent(tracer.model):
        return "to take the general path, as fake tensors cannot run every fast path"
    return None


def _traced(model: torch.nn.Module, inputs: Any, options: TraceOptions, notes: list[str],
            function_level: str | None = None) -> TraceResult:
    notes = list(notes)
    tracers: list[Tracer] = []
    step_starts: list[int] = []  # the index of each decode step's first op

    def tracer_for(call: Call) -> Tracer:
        tracer = Tracer(model, stats=options.stats and options.mode == "value", state=call.state, on_module=on_module,
                        max_ops=options.max_ops, autocast_device=options.autocast,
                        function_level=function_level, go_past=options.go_past,
                        compute_dtype=options.compute_dtype)
        tracer.add_inputs(call.args, call.kwargs, call.names)
        tracers.append(tracer)
        return tracer

    total = sum(1 for _ in model.modules())
    with progress_bar(options.progress, "tracing", total=total, unit="module") as on_module:
        ran = run_forward(model, inputs, mode=options.mode, fake_mode=options.fake_mode,
                          attn_implementation=options.attn_implementation, notes=notes, recorder=tracer_for,
                          steps=options.steps, on_step=lambda _: step_starts.append(len(tracers[0].records)))
    (tracer,) = tracers
    notes += _written_note(tracer.written_parameters | set(ran.written_parameters))
    path_note = tracer.function_level_note()
    if path_note is not None:
        notes.append(path_note)
    if tracer.autocast_casts:
        notes.append(_autocast_note(POLICIES[options.autocast]))
    error = ran.error
    if tracer.refusals:
        notes.append(_went_past_note(tracer, ran.error))
        error = tracer.refusals[0]  # where the deployment stops
    return TraceResult(tracer, error, fake=options.mode == "meta", notes=notes, torch_log=ran.torch_log,
                       step_starts=step_starts, step_name="call" if getattr(model, "calls_again", False) else "decode step")


def _went_past_note(tracer: Tracer, error: Exception | None) -> str:
    count = len(tracer.refusals)
    went = (f"the trace went on past {'the kernel' if count == 1 else f'{count} kernels'} that refused a mix of "
            "dtypes, each run on its operands cast to its module's dtype, to find the errors behind the first")
    if error is not None:
        went += f"; then the forward raised {type(error).__name__}: {first_line(error)}"
    return went


def _autocast_note(policy: AutocastPolicy) -> str:
    """Whose autocast policy the trace applied: the installed torch's own registrations."""
    named = ", ".join(sorted(policy.float32_ops & {"layer_norm", "rms_norm", "group_norm", "softmax"}))
    return (f"autocast as {policy.device} runs it, read from torch {policy.torch_version}'s own registrations: "
            f"{len(policy.lower_ops)} ops in the autocast dtype, {len(policy.float32_ops)} in float32"
            + (f" ({named} among them)" if named else ""))


def _graph(result: TraceResult) -> DtypeGraph:
    graph = DtypeGraph.from_trace(result)
    result.tracer.release()
    return graph


def trace(model: torch.nn.Module, inputs: Any, *, mode: str = "value", stats: bool = False) -> DtypeGraph:
    """Run ``model`` on ``inputs`` under the tracer and return the dtype graph (never raises for a
    forward that fails: the graph holds the ops up to the failing one, marked ``failed``; a kernel that
    refused a mix of dtypes is marked ``failed`` too, and the trace went on past it: ``Tracer.go_past``)."""
    notes: list[str] = []
    model = _unwrap(model, notes)
    return _graph(_run(model, inputs, TraceOptions(mode=mode, stats=stats, max_ops=Options().max_ops), notes))


def _report(result: TraceResult, *, compute_dtype: torch.dtype, settings: Settings, rerun: Rerun | None = None,
            stored: Mapping[str, str] | None = None) -> Report:
    graph = _graph(result)
    context = RuleContext(
        graph=graph,
        model=result.tracer.model_info,
        compute_dtype=compute_dtype,
        pack=settings.pack,
        error=result.error,
        options=settings.options,
    )
    findings = _first_step_of_each(run_rules(context, settings.selection, settings.rules), graph)
    return Report(
        graph=graph,
        findings=findings,
        model=context.model.class_name,
        backend=settings.pack.name,
        mode=graph.graph["mode"],
        compute_dtype=dtype_name(compute_dtype),
        notes=result.notes + _brought_notes(settings) + _stored_notes(context, settings, findings, stored or {}),
        tensor_dtypes={name: dtype_name(info.dtype) for name, info in context.model.tensors.items()},
        judged=dict(context.judged),
        steps=1 + len(graph.graph["step_starts"]),
        rerun=rerun,
    )


def _first_step_of_each(findings: list[Finding], graph: DtypeGraph) -> list[Finding]:
    """A decode step runs the layers again: its finding for the same rule, place and tensor as an earlier
    one is the same defect, kept once (the rules judge the calls in order), as is a finding about a leaf
    made alike on every call. One that only a decode step shows says so."""
    seen: set[tuple[str, str, str | None]] = set()
    identical: set[tuple[str, str, str | None, str, str | None]] = set()  # a leaf's finding made on each call
    kept = []
    for finding in findings:
        key, step = (finding.code, finding.location, finding.tensor), _step(graph, finding.node)
        whole = (*key, finding.message, finding.node)
        if (step and key in seen) or whole in identical:
            continue
        seen.add(key)
        identical.add(whole)
        kept.append(replace(finding, message=f"{finding.message} ({_step_shown(graph, step)})") if step else finding)
    return kept


def _step_shown(graph: DtypeGraph, step: int) -> str:
    """"in decode step 1", or "in call 2" for a model called again as it was (a pipeline's second call)."""
    if graph.graph.get("step_name") == "call":
        return f"in call {step + 1}: state the first call left"
    return f"in decode step {step}"


def _step(graph: DtypeGraph, node: str | None) -> int:
    """The call an op ran in, or a tensor was made in (0: the first call, or a leaf)."""
    if node is None or node not in graph:
        return 0
    if graph.nodes[node]["kind"] != "op":
        node = graph.producer(node)
        if node is None:
            return 0
    return graph.nodes[node].get("step", 0)


def _brought_notes(settings: Settings) -> list[str]:
    return [f"attn_implementation {settings.attn_implementation!r} brings the {name} pack along (its kernels "
            f"run on CUDA)"
            for name in settings.brought_packs]


def _stored_notes(context: RuleContext, settings: Settings, findings: list[Finding],
                  stored: Mapping[str, str]) -> list[str]:
    """Where a checkpoint of mixed stored dtypes stores tensors in another dtype than the audit ran them
    (``from_pretrained`` casts on load; a loader that keeps stored dtypes does not): a note naming them, and
    what the backend's contracts say of the forward with those tensors as stored."""
    floating = {name: dtype for name, dtype in stored.items() if _stored_floating(dtype) is not None}
    if len(set(floating.values())) < 2:
        return []  # one stored float dtype: a load in another dtype casts everything alike, as asked
    differ = {name: (floating[name], dtype_name(info.dtype)) for name, info in context.model.tensors.items()
              if name in floating and floating[name] != dtype_name(info.dtype) and info.dtype.is_floating_point}
    if not differ:
        return []
    listed = ", ".join(f"{name} {kept}" for name, (kept, _) in list(differ.items())[:5])
    more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
    loaded = sorted({ran for _, ran in differ.values()})
    note = (f"the checkpoint stores {len(differ)} tensor{'s' if len(differ) > 1 else ''} in another dtype than the "
            f"audit ran ({', '.join(loaded)}: from_pretrained casts to the dtype asked for): {listed}{more}; a loader that "
            "keeps stored dtypes runs them as stored")
    seen = {(finding.code, finding.location) for finding in findings}
    sites: dict[tuple[str, str], Finding] = {}
    for finding in _judged_as_stored(context, settings, differ):
        if (finding.code, finding.location) not in seen:
            sites.setdefault((finding.code, finding.location), finding)
    if sites:
        shown = "; ".join(f"{code} at {location or '<model>'} ({finding.message})"
                          for (code, location), finding in list(sites.items())[:3])
        note += f", and under {settings.pack.name} that is {shown}" + (f" and {len(sites) - 3} more" if len(sites) > 3 else "")
    return [note]


def _stored_floating(name: str) -> torch.dtype | None:
    """The floating torch dtype a stored dtype name (``dtypelint.load.SAFETENSORS_DTYPES``) is, else None."""
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _judged_as_stored(context: RuleContext, settings: Settings, differ: Mapping[str, tuple[str, str]]) -> list[Finding]:
    """The backend's kernel contracts over the same forward with ``differ``'s tensors in their stored dtype."""
    contracts = [rule for rule in settings.rules if rule.pack is not None]
    if not contracts:
        return []
    graph = context.graph.copy()
    for node in graph.tensors():
        data = graph.tensor(node)
        if data["origin"] in LEAF_ORIGINS and data["name"] in differ:
            graph.nodes[node]["dtype"] = differ[data["name"]][0]
    tensors = {name: replace(info, dtype=_stored_floating(differ[name][0])) if name in differ else info
               for name, info in context.model.tensors.items()}
    as_stored = replace(context, graph=graph, model=replace(context.model, tensors=tensors), judged=Counter())
    return run_rules(as_stored, settings.selection, contracts)


def audit(
    model: torch.nn.Module,
    inputs: Any,
    *,
    mode: str = "value",
    stats: bool = True,
    settings: Settings | None = None,
    progress: bool = False,
    **overrides: Unpack[SettingOverrides],
) -> Report:
    """Trace one forward of ``model`` on ``inputs`` and run the rules of the backend over it.

    ``inputs`` is a tensor, a tuple of positional arguments or a dict of keyword arguments.
    ``mode="meta"`` runs the forward on fake copies of the weights. ``progress`` shows a bar on stderr for
    traces that take more than a second. Settings (``dtypelint.config.SettingOverrides``): ``dtype``, the
    intended compute dtype (default: the dtype of most parameter elements); ``backend``, a shipped pack
    or a pack file, or a list of them (default ``hf-eager``); ``packs``, extra packs; ``select``,
    ``ignore``, ``extend_select``, ``per_location_ignores``, ``severity``, ``options``, ``fail_on``,
    ``attn_implementation`` (``"flash_attention_2"``: audit a flash-attention deployment on a machine without
    flash_attn; default: the model config's own). They
    override ``settings`` (``dtypelint.config.load_settings()``). The model is left exactly as it was.
    """
    return _audit(model, inputs, TraceOptions(mode=mode, stats=stats, progress=progress),
                  (settings or Settings()).layered(overrides))


def _audit(model: torch.nn.Module, inputs: Any, chosen: TraceOptions, settings: Settings,
           stored: Mapping[str, str] | None = None) -> Report:
    """``audit`` with resolved settings; ``stored``: the dtypes the checkpoint stores, by tensor name. The
    cyclic collector pauses meanwhile: records, graph nodes and findings make no cycles, and scanning them
    cost a fifth of a launch-bound audit; what the forward leaves in cycles is collected afterwards."""
    with no_cyclic_collection():
        return _audited(model, inputs, chosen, settings, stored)


def _audited(model: torch.nn.Module, inputs: Any, chosen: TraceOptions, settings: Settings,
             stored: Mapping[str, str] | None) -> Report:
    notes: list[str] = []
    model = _unwrap(model, notes)
    compute_dtype = parse_dtype(settings.dtype) or infer_compute_dtype(model)
    options = TraceOptions.from_settings(settings, mode=chosen.mode, stats=chosen.stats, progress=chosen.progress,
                                         compute_dtype=compute_dtype)
    result = _run(model, inputs, options, notes)
    value = chosen.mode == "value"
    rerun = Rerun(inputs, functools.partial(_audit_again, settings, dtype_name(compute_dtype))) if value else None
    return _report(result, compute_dtype=compute_dtype, settings=settings, rerun=rerun, stored=stored)


def _audit_again(settings: Settings, compute_dtype: str, model: torch.nn.Module, inputs: Any, **overrides: Any) -> Report:
    """``audit`` with the settings and compute dtype of an earlier audit (``Report.rerun``)."""
    return audit(model, inputs, settings=settings, **{"dtype": compute_dtype, **overrides})


def audit_config(
    config: Any,
    *,
    batch: int = 1,
    seq_len: int = 16,
    trust_remote_code: bool = False,
    model_class: str | None = None,
    inputs_dtype: str | torch.dtype | None = None,
    settings: Settings | None = None,
    progress: bool = False,
    **overrides: Unpack[SettingOverrides],
) -> Report:
    """Audit a model from its config alone (meta mode): no weights are allocated, so a 70B config audits
    on a laptop. ``config`` is a transformers config, a ``config.json`` path or a directory. The model is
    the class ``config.architectures`` names (else the first task mapping with one for its
    ``model_type``), or the transformers class ``model_class`` names; its inputs are made from the config
    (``dtypelint.inputs``), float ones in ``inputs_dtype`` (default: the compute dtype). The settings are
    those of ``audit``."""
    resolved = (settings or Settings()).layered(overrides)
    request = Request(config=config, mode="meta", dtype=parse_dtype(resolved.dtype), batch=batch, seq_len=seq_len,
                      trust_remote_code=trust_remote_code, model_class=model_class,
                      inputs_dtype=parse_dtype(inputs_dtype), max_input_elements=resolved.options.max_input_elements,
                      max_layers=resolved.options.max_layers)
    return audit_loaded(load(request), settings=resolved, progress=progress)


def audit_loaded(loaded: Loaded, *, settings: Settings, progress: bool = False) -> Report:
    """Audit what a loader returned (``dtypelint.load.load``), in its mode."""
    if loaded.mode == "value":
        resolved = settings.layered({"dtype": loaded.dtype})
        report = _audit(loaded.model, loaded.inputs, TraceOptions(stats=True, progress=progress), resolved,
                        stored=loaded.stored_dtypes)
        return _with_load(loaded, report, loaded.inputs)

    options = TraceOptions.from_settings(settings, mode="meta", progress=progress, fake_mode=loaded.fake_mode,
                                         compute_dtype=loaded.dtype)
    inputs = loaded.inputs
    result = _run(loaded.model, inputs, options, [])
    if needs_values(result.error) and "attention_mask" in inputs:
        # Older transformers inspect the mask's values (is it all ones?). Real all-ones masks take the
        # causal path without one, so that path is what to audit.
        unmasked = {name: value for name, value in inputs.items() if name != "attention_mask"}
        retry = _run(loaded.model, unmasked, options, [])
        if len(retry.tracer.records) > len(result.tracer.records):
            result, inputs = retry, unmasked
            result.notes.append(
                "meta mode: this transformers reads the attention mask's values, so the forward was traced "
                "without attention_mask (the causal path an all-ones mask takes)"
            )
    report = _report(result, compute_dtype=loaded.dtype or torch.float32, settings=settings, stored=loaded.stored_dtypes)
    return _with_load(loaded, report, inputs)


def _with_load(loaded: Loaded, report: Report, inputs: Any) -> Report:
    """What the loader chose, on the report: the class and where its name came from, the inputs it made
    (those the forward was given: meta mode may have dropped the mask)."""
    report.model_source = loaded.model_source
    report.made_inputs = [made for made in loaded.made_inputs if made.name in inputs]
    report.notes += [*loaded.notes, *_call_notes(loaded.model)]
    _name_boundaries(loaded.model, report.findings)
    return report


def _name_boundaries(model: torch.nn.Module, findings: list[Finding]) -> None:
    """An error inside a component the pipeline called with inputs off its dtype ends with that call: its
    cause is on the other side of the boundary (a float32 text encoder's output into a float16 UNet)."""
    boundaries = getattr(model, "boundaries", None) or {}
    for finding in findings:
        component = finding.location.split(".")[0]
        if finding.severity == Severity.ERROR and component in boundaries:
            finding.message += f"; {boundaries[component]}"
    if boundaries:
        boundaries.clear()


def _call_notes(model: torch.nn.Module) -> list[str]:
    """What a model that runs a pipeline noted per call (``diffusion.PipelineModules``): the first call's
    notes, and a later call's where they differ ("call 2: ...")."""
    calls, notes = getattr(model, "call_notes", None) or [], []
    for number, noted in enumerate(calls, 1):
        notes += [note if number == 1 else f"call {number}: {note}" for note in noted if note not in calls[0]
                  or number == 1]
    if calls:
        calls.clear()
    return notes


_STORED_FLOATS = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                  "bfloat16": torch.bfloat16}


def audit_static(path: str | Path, *, settings: Settings | None = None, **overrides: Unpack[SettingOverrides]) -> Report:
    """Without a forward: the dtypes a checkpoint stores (its safetensors headers, no weights read) against
    the compute dtype (``dtype``, else the one config.json declares), judged by the param-dtype rule."""
    resolved = (settings or Settings()).layered(overrides)
    component = component_class_name(local_path(path))  # a diffusers component: its config declares no dtype
    config = None if component else load_config(path)
    compute = parse_dtype(resolved.dtype) or (config_dtype(config) if config is not None else None)
    stored = stored_dtypes(path)
    notes = ["stored dtypes: " + ", ".join(f"{count} {name}" for name, count in sorted(Counter(stored.values()).items()))]
    tensors = {name: TensorInfo(OriginKind.PARAMETER, _STORED_FLOATS[dtype], (), "disk")
               for name, dtype in stored.items() if dtype in _STORED_FLOATS}
    name = component or (config_value(config, "architectures") or [type(config).__name__])[0]
    model = ModelInfo(name, {}, tensors, {}, [], None if component else config_value(config, "model_type"))
    findings, judged = [], {}
    if compute is None:
        notes.append("config.json declares no dtype and none was given (--dtype): nothing to compare with")
    else:
        context = RuleContext(graph=_static_graph(), model=model, compute_dtype=compute, pack=resolved.pack,
                              options=resolved.options)
        findings = run_rules(context, resolved.selection, [rule for rule in resolved.rules if rule.judges_model_only])
        judged = dict(context.judged)
    return Report(graph=_static_graph(), findings=findings, model=model.class_name, backend=resolved.pack.name,
                  mode="static", compute_dtype=dtype_name(compute) if compute else "unknown", notes=notes,
                  tensor_dtypes=dict(stored), judged=judged)


def _static_graph() -> DtypeGraph:
    graph = DtypeGraph()
    graph.graph.update(model=None, mode="static", stats=False, error=None)
    return graph
