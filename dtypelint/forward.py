"""The one place that runs a model's forward, for the tracer, for ``fix``'s measurements and for anything
else that runs the model.

``run_forward`` prepares the call once (``prepare_call``: positional and keyword arguments from what the
caller passed), runs it on fresh copies of the input tensors (value mode) or on fake stand-ins of the
weights and inputs (meta mode), under ``no_grad``, with a flash attention implementation on its CPU
stand-in, and inside ``state.preserved``, which puts back whatever the forward changed. A recorder (the
tracer) is entered right around the call. The forward's exception is returned, never raised.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from dtypelint.attention import diffusers_attention_backends, known_attention_implementations
from dtypelint.diffusion import attention_backend_standin, dispatcher_backend, is_diffusers_model, runs_flash_attn
from dtypelint.errors import UsageError
from dtypelint.fake import fake_attributes, fake_call, new_fake_mode
from dtypelint.flash_standin import flash_standin, requested_flash
from dtypelint.state import fresh_copies, preserved

MODES = ("value", "meta")
# Where a fake kernel that fails logs its traceback at ERROR level ("E1203 ... fake_tensor.py:3090]"): on
# stderr it reads as a crash of dtypelint, so it is kept for the trace-limit finding instead.
FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"


@dataclass(frozen=True)
class Call:
    """One forward's arguments; ``names``: the forward's positional parameter names; ``state``: the fake
    stand-ins of the model's parameters and buffers a meta-mode call runs on (None: the model's own)."""

    args: tuple
    kwargs: dict[str, Any]
    names: list[str]
    state: dict[str, torch.Tensor] | None = None


@dataclass
class Ran:
    """What one forward did: its output, or the exception it raised, and the parameters it wrote in place
    (which ``preserved`` reports but cannot undo)."""

    output: Any = None
    error: Exception | None = None
    written_parameters: list[str] = field(default_factory=list)
    torch_log: list[str] = field(default_factory=list)  # what torch's fake tensors logged (meta mode)
    steps: int = 0  # the calls run: the first, then the decode steps


def prepare_call(model: torch.nn.Module, inputs: Any) -> Call:
    """The arguments for ``inputs``: a tensor, a tuple/list of positional args, or a mapping of keyword args."""
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    elif isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
        if not all(isinstance(key, str) for key in kwargs):
            raise UsageError("keyword inputs need string keys")
    else:
        raise UsageError(
            f"inputs must be a tensor, a tuple of positional arguments or a dict of keyword arguments, "
            f"not {type(inputs).__name__}"
        )
    try:
        parameters = inspect.signature(model.forward).parameters.values()
        names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    return Call(args, kwargs, names)


def _attention_standin(model: torch.nn.Module, requested: str | None,
                       notes: list[str] | None) -> AbstractContextManager[None]:
    """The CPU stand-in for the attention kernel the deployment runs, where that is not SDPA."""
    if is_diffusers_model(model) and requested not in (None, "sdpa", "eager", "native"):
        backend = dispatcher_backend(requested)
        checked = ("as a flash-attention call" if runs_flash_attn(backend)
                   else f"against the {backend} backend's own checks (diffusers' constraints)")
        _note(notes, f"attention traced with a CPU stand-in for diffusers' {backend} backend (SDPA numerics); "
                     f"every attention call is checked {checked}")
        return attention_backend_standin(backend)
    if (requested is not None and requested not in known_attention_implementations()
            and requested in diffusers_attention_backends()):  # diffusers imported only for a name it may own
        raise UsageError(f"attn_implementation {requested!r} is a backend of diffusers' attention dispatcher; "
                         f"{type(model).__name__} is not a diffusers model")
    flash = requested_flash(model, requested)
    if flash is None:
        return nullcontext()
    _note(notes, f"attention traced with a CPU stand-in for {flash} (SDPA numerics); every attention "
                 "call is checked as a flash-attention call")
    return flash_standin(model, flash)


def run_forward(
    model: torch.nn.Module,
    inputs: Any,
    *,
    mode: str = "value",
    fake_mode: Any = None,
    attn_implementation: str | None = None,
    notes: list[str] | None = None,
    recorder: Callable[[Call], AbstractContextManager[Any]] | None = None,
    steps: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> Ran:
    """Run one forward of ``model`` on ``inputs`` (see the module docs); meta mode in ``fake_mode`` (default:
    a new one).
    ``attn_implementation``: the attention the deployment runs (default: the model config's); a flash one
    runs on its CPU stand-in and says so in ``notes``. ``recorder(call)`` is made before the call, outside
    fake mode, and entered right around it. ``steps``: a generative model (one that returns a cache and
    logits for ``input_ids``) runs ``steps - 1`` decode steps after the first call, each fed the token it
    predicted and the cache it returned, as ``generate`` does (``Decoding``); ``on_step(n)`` is called
    before decode step ``n`` (1, 2, ...)."""
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    refuse_deferred(model)
    call = prepare_call(model, inputs)
    if mode == "meta":
        fake_mode = fake_mode or new_fake_mode()
        state, args, kwargs = fake_call(model, call.args, call.kwargs, fake_mode)
        call = Call(args, kwargs, call.names, state)
    elif any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()]):
        raise UsageError("the model has tensors on the meta device, which value mode cannot run; use mode='meta'")
    else:
        call = Call(*fresh_copies((call.args, call.kwargs)), call.names)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        steps = 1  # its decoder steps on decoder_input_ids and the encoder's outputs: not decoded here
    ran = Ran()
    with ExitStack() as stack:
        kept = stack.enter_context(preserved(model))
        stack.enter_context(_attention_standin(model, attn_implementation, notes))
        if mode == "meta":
            stack.enter_context(fake_attributes(model, fake_mode))
            ran.torch_log = stack.enter_context(captured_log(FAKE_TENSOR_LOGGER))
        recording = recorder(call) if recorder is not None else nullcontext()
        if mode == "meta":
            stack.enter_context(fake_mode)
        stack.enter_context(torch.no_grad())
        try:
            with recording:
                step: Call | None = call
                decoding = Decoding(model, call)
                for number in range(steps):
                    if number:
                        with _unrecorded():
                            try:
                                step = decoding.next_call(ran.output)
                            except Exception as exception:  # noqa: BLE001 - the model's own preparation
                                _note(notes, f"decode step {number} not run: preparing it as generate does "
                                             f"raised {type(exception).__name__}: {exception}")
                                break
                        if step is None:
                            break
                        if on_step is not None:
                            on_step(number)
                    ran.steps = number + 1
                    ran.output = _call(model, step)
        except Exception as exception:  # noqa: BLE001 - the caller reports whatever the forward raised
            ran.error = exception
    ran.written_parameters = list(kept.written_parameters)
    return ran


# The output fields a model's main result is in, by kind: transformers' ModelOutput and diffusers' outputs.
OUTPUT_FIELDS = (("logits", "logits"), ("sample", "image"), ("images", "image"), ("pixel_values", "image"),
                 ("reconstruction", "image"), ("last_hidden_state", "hidden states"))


def first_tensor(output: Any) -> torch.Tensor | None:
    """A forward's main result: its logits, image or hidden states, the tensor it returned, or the first of
    a returned tuple."""
    if isinstance(output, torch.Tensor):
        return output
    for name, _ in OUTPUT_FIELDS:
        candidate = getattr(output, name, None)
        if isinstance(candidate, torch.Tensor):
            return candidate
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def output_kind(output: Any) -> str:
    """What ``first_tensor(output)`` holds: "logits", "image" or "hidden states" (a bare tensor of four
    dimensions is an image)."""
    for name, kind in OUTPUT_FIELDS:
        if isinstance(getattr(output, name, None), torch.Tensor):
            return kind
    main = first_tensor(output)
    return "image" if main is not None and main.dim() == 4 else "hidden states"


@contextmanager
def captured_log(name: str) -> Iterator[list[str]]:
    """The first line of each message the logger ``name`` emits in the body, kept from its handlers."""
    messages: list[str] = []
    logger = logging.getLogger(name)
    saved = logger.handlers, logger.propagate  # torch gives the logger a stderr handler of its own
    logger.handlers, logger.propagate = [_Collect(messages)], False
    try:
        yield messages
    finally:
        logger.handlers, logger.propagate = saved


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__()
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().split("\n", 1)[0])


def _call(model: torch.nn.Module, call: Call) -> Any:
    if call.state is None:
        return model(*call.args, **call.kwargs)
    return torch.func.functional_call(model, call.state, call.args, call.kwargs, strict=False)


@contextmanager
def _unrecorded() -> Iterator[None]:
    """dtypelint's own tensor work between two calls (the next token, the longer mask): outside every
    recording mode. Fake tensors stay fake: they carry their mode."""
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        yield


class Decoding:
    """What ``generate`` carries from one forward to the next: the sequence so far and the keyword arguments
    (cache, attention mask, positions). A transformers model advances them with its own
    ``_update_model_kwargs_for_generation`` and makes the next forward's arguments with its own
    ``prepare_inputs_for_generation``, as greedy ``generate`` does; another module that returns a cache and
    logits is fed the predicted token, its cache and a mask one longer. ``next_call`` is None where the
    output has no cache or no logits, or the call had no 2-d ``input_ids`` keyword (nothing to decode)."""

    def __init__(self, model: torch.nn.Module, call: Call) -> None:
        self.model, self.call = model, call
        ids = call.kwargs.get("input_ids")
        self.ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not call.args else None
        self.kwargs = {name: value for name, value in call.kwargs.items() if name != "input_ids"}
        self.prepared_by_model = _prepares_its_own_steps(model)

    def next_call(self, output: Any) -> Call | None:
        if getattr(self.model, "calls_again", False):  # a pipeline: the same call again, on what the first left
            return self.call
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        logits = getattr(output, "logits", None)
        if self.ids is None or cache is None or not isinstance(logits, torch.Tensor):
            return None
        token = logits[:, -1:].argmax(-1).to(self.ids.dtype)
        if not self.prepared_by_model:
            self.call = _next_plain_call(self.call, token, cache, _cache_keyword(self.model))
            return self.call
        self.kwargs = self.model._update_model_kwargs_for_generation(output, {**self.kwargs, "use_cache": True})
        self.ids = torch.cat([self.ids, token], dim=-1)
        kwargs = self.model.prepare_inputs_for_generation(self.ids, next_sequence_length=1, **self.kwargs)
        return Call((), dict(kwargs), self.call.names, self.call.state)


def _prepares_its_own_steps(model: torch.nn.Module) -> bool:
    """True for a transformers GenerationMixin whose preparation slices the step itself
    (``next_sequence_length``, transformers >= 5.24); False: the plain step. A model can be one only once
    transformers has imported it, so nothing is imported here."""
    mixin = getattr(sys.modules.get("transformers.generation.utils"), "GenerationMixin", None)
    if mixin is None or not isinstance(model, mixin):
        return False
    return "next_sequence_length" in inspect.signature(mixin.prepare_inputs_for_generation).parameters


def _cache_keyword(model: torch.nn.Module) -> str:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _next_plain_call(call: Call, token: torch.Tensor, cache: Any, cache_keyword: str) -> Call:
    kwargs = {"input_ids": token, cache_keyword: cache, "use_cache": True}
    mask = call.kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    for name in ("position_ids", "cache_position"):
        positions = call.kwargs.get(name)
        if isinstance(positions, torch.Tensor):
            kwargs[name] = positions[..., -1:] + 1
    return Call((), kwargs, call.names, call.state)


def _note(notes: list[str] | None, note: str) -> None:
    if notes is not None:
        notes.append(note)


def refuse_deferred(model: torch.nn.Module) -> None:
    """A forward that is a generator or coroutine function computes nothing when called: its trace would
    be empty, and a clean report of it false."""
    forward = model.forward
    if inspect.isgeneratorfunction(forward) or inspect.isasyncgenfunction(forward):
        kind = "generator"
    elif inspect.iscoroutinefunction(forward):
        kind = "coroutine"
    else:
        return
    raise UsageError(f"{type(model).__name__}.forward returns a {kind}, so calling it runs nothing; dtypelint "
                     f"traces a forward that computes when called (wrap the model to consume it)")
