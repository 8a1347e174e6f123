"""The audit API: load -> trace -> graph -> rules -> report, for a model object or a config."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Unpack

import torch
from torch._subclasses.fake_tensor import FakeTensor

from dtypelint.config import SettingOverrides, Settings
from dtypelint.dtypes import dtype_name, parse_dtype
from dtypelint.errors import UsageError
from dtypelint.graph import DtypeGraph
from dtypelint.load import build_meta_model, call_arguments, config_dtype, load_config, sample_inputs
from dtypelint.report import Report
from dtypelint.rules import run_rules
from dtypelint.rules.base import Options, RuleContext
from dtypelint.standins import flash_standin, requested_flash
from dtypelint.state import preserved
from dtypelint.trace import Tracer, TraceResult, needs_values

MODES = ("value", "meta")


def infer_compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype holding most parameter elements (float32 for a model without any)."""
    sizes: Counter[torch.dtype] = Counter()
    for param in model.parameters():
        if param.is_floating_point():
            sizes[param.dtype] += param.numel()
    return sizes.most_common(1)[0][0] if sizes else torch.float32


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
    return model


def _fake(tensor: torch.Tensor, fake_mode: Any) -> torch.Tensor:
    """A fake CPU stand-in (shape, dtype, no storage) for a real or meta tensor."""
    if isinstance(tensor, FakeTensor) and tensor.fake_mode is fake_mode:
        return tensor
    if tensor.device.type == "meta":
        return fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, tensor, torch.device("cpu"))
    return fake_mode.from_tensor(tensor)


def _fake_value(value: Any, fake_mode: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _fake(value, fake_mode)
    if isinstance(value, (list, tuple)):
        return type(value)(_fake_value(item, fake_mode) for item in value)
    return value


def _fake_call(
    model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], fake_mode: Any
) -> tuple[dict[str, torch.Tensor], tuple, dict[str, Any]]:
    """Fake stand-ins of the model's parameters and buffers (for ``functional_call``) and of the inputs."""
    state = {name: _fake(t, fake_mode) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    fake_kwargs = {name: _fake_value(value, fake_mode) for name, value in kwargs.items()}
    return state, _fake_value(args, fake_mode), fake_kwargs


@contextmanager
def _fake_attributes(model: torch.nn.Module, fake_mode: Any) -> Iterator[None]:
    """Plain tensor attributes (GPT-J's ``embed_positions``) as fake stand-ins for the call only:
    ``functional_call`` swaps parameters and buffers, not these."""
    swapped = [
        (module, name, value)
        for module in model.modules()
        for name, value in vars(module).items()
        if isinstance(value, torch.Tensor)
    ]
    for module, name, value in swapped:
        module.__dict__[name] = _fake(value, fake_mode)
    try:
        yield
    finally:
        for module, name, value in swapped:
            module.__dict__[name] = value


def new_fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _written_note(parameters: set[str]) -> list[str]:
    if not parameters:
        return []
    return [f"the forward wrote parameter{'s' if len(parameters) > 1 else ''} {', '.join(sorted(parameters))} "
            "in place; dtypelint cannot undo it"]


def _run(
    model: torch.nn.Module,
    inputs: Any,
    *,
    mode: str,
    stats: bool,
    notes: list[str],
    progress: bool = False,
    max_ops: int | None = None,
    fake_mode: Any = None,
    attn_implementation: str | None = None,
) -> TraceResult:
    """Trace one forward. Exceptions of the forward are kept in the result, never raised. The model and
    global state are restored afterwards (``dtypelint.state.preserved``).

    Meta mode runs the forward inside ``FakeTensorMode`` (``fake_mode``, or a new one) on fake CPU
    stand-ins of the model's tensors (swapped in by ``functional_call`` for the call only) and of the
    inputs: shapes and dtypes, no data.

    A flash attention implementation (``attn_implementation``, else the model config's) runs on a CPU
    stand-in for the forward only (``dtypelint.standins``), and its calls are recorded as flash sites.
    """
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    args, kwargs, names = call_arguments(model, inputs)
    state = None
    if mode == "meta":
        fake_mode = fake_mode or new_fake_mode()
        state, args, kwargs = _fake_call(model, args, kwargs, fake_mode)
    elif any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()]):
        raise UsageError("the model has tensors on the meta device, which value mode cannot run; use mode='meta'")
    else:
        fake_mode = None
    error = None
    with ExitStack() as stack:
        kept = stack.enter_context(preserved(model))
        flash = requested_flash(model, attn_implementation)
        if flash is not None:
            stack.enter_context(flash_standin(model, flash))
            notes.append(f"attention traced with a CPU stand-in for {flash} (SDPA numerics); every attention "
                         "call is checked as a flash-attention call")
        if fake_mode is not None:
            stack.enter_context(_fake_attributes(model, fake_mode))
        on_module = None
        if progress:
            from tqdm.auto import tqdm  # a transformers dependency

            bar = stack.enter_context(
                tqdm(total=sum(1 for _ in model.modules()), desc="tracing", unit="module", delay=1.0, leave=False)
            )
            on_module = bar.update
        tracer = Tracer(model, stats=stats and mode == "value", state=state, on_module=on_module, max_ops=max_ops)
        tracer.add_inputs(args, kwargs, names)
        if fake_mode is not None:
            stack.enter_context(fake_mode)
        stack.enter_context(torch.no_grad())
        try:
            with tracer:
                if state is None:
                    model(*args, **kwargs)
                else:
                    torch.func.functional_call(model, state, args, kwargs, strict=False)
        except Exception as exception:  # noqa: BLE001 - the audit reports whatever the forward raised
            error = exception
    notes += _written_note(tracer.written_parameters | set(kept.written_parameters))
    return TraceResult(tracer, error, fake=fake_mode is not None, notes=notes)


def _graph(result: TraceResult) -> DtypeGraph:
    graph = DtypeGraph.from_trace(result)
    result.tracer.release()
    return graph


def trace(model: torch.nn.Module, inputs: Any, *, mode: str = "value", stats: bool = False) -> DtypeGraph:
    """Run ``model`` on ``inputs`` under the tracer and return the dtype graph (never raises for a
    forward that fails: the graph holds the ops up to the failing one, marked ``failed``)."""
    notes: list[str] = []
    model = _unwrap(model, notes)
    return _graph(_run(model, inputs, mode=mode, stats=stats, notes=notes, max_ops=Options().max_ops))


def _report(result: TraceResult, *, compute_dtype: torch.dtype, settings: Settings, inputs: Any = None) -> Report:
    graph = _graph(result)
    context = RuleContext(
        graph=graph,
        model=result.tracer.model_info,
        compute_dtype=compute_dtype,
        pack=settings.pack,
        error=result.error,
        options=settings.options,
    )
    return Report(
        graph=graph,
        findings=run_rules(context, settings.selection, settings.rules),
        model=context.model.class_name,
        backend=settings.pack.name,
        mode=graph.graph["mode"],
        compute_dtype=dtype_name(compute_dtype),
        notes=result.notes,
        tensor_dtypes={name: dtype_name(info.dtype) for name, info in context.model.tensors.items()},
        settings=settings,
        inputs=inputs,
    )


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
    notes: list[str] = []
    model = _unwrap(model, notes)
    resolved = (settings or Settings()).layered(overrides)
    compute_dtype = parse_dtype(resolved.dtype) or infer_compute_dtype(model)
    result = _run(
        model, inputs, mode=mode, stats=stats, notes=notes, progress=progress, max_ops=resolved.options.max_ops,
        attn_implementation=resolved.attn_implementation,
    )
    return _report(result, compute_dtype=compute_dtype, settings=resolved, inputs=inputs if mode == "value" else None)


def audit_config(
    config: Any,
    *,
    batch: int = 1,
    seq_len: int = 16,
    trust_remote_code: bool = False,
    settings: Settings | None = None,
    progress: bool = False,
    **overrides: Unpack[SettingOverrides],
) -> Report:
    """Audit a causal LM from its config alone (meta mode): no weights are allocated, so a 70B config
    audits on a laptop. ``config`` is a transformers config, a ``config.json`` path or a directory; the
    settings are those of ``audit``."""
    resolved = (settings or Settings()).layered(overrides)
    config = load_config(config, trust_remote_code=trust_remote_code)
    compute_dtype = parse_dtype(resolved.dtype) or config_dtype(config) or torch.float32
    model = build_meta_model(config, compute_dtype)
    fake_mode = new_fake_mode()
    with fake_mode:  # fake inputs: no memory however large batch x seq_len is
        inputs = sample_inputs(model, config, batch=batch, seq_len=seq_len)

    def run() -> TraceResult:
        return _run(
            model, inputs, mode="meta", stats=False, notes=[], progress=progress,
            max_ops=resolved.options.max_ops, fake_mode=fake_mode, attn_implementation=resolved.attn_implementation,
        )

    result = run()
    if needs_values(result.error) and "attention_mask" in inputs:
        # Older transformers inspect the mask's values (is it all ones?). Real all-ones masks take the
        # causal path without one, so that path is what to audit.
        del inputs["attention_mask"]
        retry = run()
        if len(retry.tracer.records) > len(result.tracer.records):
            result = retry
            result.notes.append(
                "meta mode: this transformers reads the attention mask's values, so the forward was traced "
                "without attention_mask (the causal path an all-ones mask takes)"
            )
    return _report(result, compute_dtype=compute_dtype, settings=resolved)
