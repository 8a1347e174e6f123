"""Attention calls as the kernel that will run them sees them: a function-level view of the trace.

Which CUDA kernel an SDPA call gets depends on the query, key, value and mask dtypes after autocast, the
head_dim, and the backends ``sdpa_kernel`` leaves enabled. ``AttentionRecorder`` (owned by the Tracer)
records each call as an ``AttentionCall``: from the aten attention op the Tracer dispatches, or, in a
flash deployment, at ``F.scaled_dot_product_attention`` itself (before autocast, which flash-attn ignores).

A deployment that runs attention through flash-attn is declared with ``flash_deployment(name)``: while it
is active every attention call is recorded as a call of that implementation, the transformers attention
interface (through ``dtypelint.flash_standin``) and direct SDPA calls (diffusers-style processors) alike.
A diffusers dispatcher backend (``diffusers:sage``) is declared the same way, and its stand-in says, with
``backend_verdict``, whether the backend's own checks refuse the call being recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dtypelint.dtypes import dtype_name
from dtypelint.errors import UsageError

SDPA = "sdpa"
_implementation: ContextVar[str] = ContextVar("dtypelint_attention_implementation", default=SDPA)
_refusal: ContextVar[str | None] = ContextVar("dtypelint_attention_refusal", default=None)
DIFFUSERS_BACKEND = "diffusers:"  # implementation prefix of a diffusers dispatcher backend
# torch.backends.cuda's switches, which ``torch.nn.attention.sdpa_kernel`` sets (also on a CPU machine).
_BACKEND_SWITCHES = {
    "flash": torch.backends.cuda.flash_sdp_enabled,
    "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
    "cudnn": torch.backends.cuda.cudnn_sdp_enabled,
    "math": torch.backends.cuda.math_sdp_enabled,
}


# transformers before its attention registry (4.48) knows these three.
_FIRST_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def known_attention_implementations() -> list[str]:
    """The ``attn_implementation`` values this transformers accepts by name: ``eager`` and its attention
    registry's keys (a hub kernel, ``org/name``, is accepted besides)."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return list(_FIRST_IMPLEMENTATIONS)
    return list(dict.fromkeys(["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]))


def diffusers_attention_backends() -> list[str]:
    """The backends of diffusers' attention dispatcher (``native``, ``flash``, ``sage``, ...); none without
    diffusers."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except ImportError:
        return []
    return [backend.value for backend in AttentionBackendName]


# Dispatcher backends that are SDPA on any device, or another device's kernels: they bring no CUDA pack.
_OFF_CUDA_BACKENDS = ("native", "_native_math", "_native_npu", "_native_xla")


def runs_cuda_kernels(implementation: str) -> bool:
    """An attention implementation whose kernels run on CUDA only: flash-attn, or a diffusers dispatcher
    backend such as sage or xformers."""
    if is_flash(implementation):
        return True
    if implementation in _OFF_CUDA_BACKENDS or implementation in known_attention_implementations():
        return False  # transformers' sdpa or eager: no need to import diffusers to know
    return implementation in diffusers_attention_backends()


def check_attention_implementation(name: str) -> None:
    """A UsageError for a value neither transformers nor diffusers' dispatcher would run (``flash_attention2``):
    it would check nothing."""
    known = known_attention_implementations()
    if isinstance(name, str) and (name in known or "/" in name):
        return
    backends = diffusers_attention_backends()
    if name in backends:
        return
    also = f"; diffusers' dispatcher knows {', '.join(backends)}" if backends else ""
    raise UsageError(f"unknown attn_implementation {name!r}; this transformers knows {', '.join(known)} "
                     f"(or a hub kernel, org/name){also}")


@contextmanager
def flash_deployment(implementation: str) -> Iterator[None]:
    """Record every attention call inside the block as a call of ``implementation`` (``flash_attention_2``)."""
    token = _implementation.set(implementation)
    try:
        yield
    finally:
        _implementation.reset(token)


@contextmanager
def backend_verdict(refusal: str | None) -> Iterator[None]:
    """Attention calls recorded inside the block are refused by their backend's own checks with ``refusal``."""
    token = _refusal.set(refusal)
    try:
        yield
    finally:
        _refusal.reset(token)


def is_flash(implementation: str) -> bool:
    return "flash" in implementation and not implementation.startswith(DIFFUSERS_BACKEND)


@dataclass(frozen=True)
class AttentionCall:
    """One attention call: dtypes as the code handed them over (before autocast), and its context."""

    index: int  # ops recorded before it: its place in the graph's execution order
    module: str
    implementation: str  # "sdpa", or the flash implementation declared for the deployment
    query: str
    key: str
    value: str
    mask: str | None  # the mask's dtype; None without a mask
    head_dim: int
    enabled_backends: tuple[str, ...]  # the SDPA backends left enabled (all four unless forced)
    autocast: str | None  # the autocast dtype active for the query's device, if any
    refused: str | None = None  # the backend's own check that refuses the call (a diffusers backend's)

    @property
    def forced(self) -> bool:
        return len(self.enabled_backends) < len(_BACKEND_SWITCHES)


def _dtype(tensor: object) -> str | None:
    return dtype_name(tensor.dtype) if isinstance(tensor, torch.Tensor) else None


def autocast_dtype(device: str) -> str | None:
    try:
        enabled = torch.is_autocast_enabled(device)
    except (RuntimeError, TypeError):  # a device type without autocast
        return None
    return dtype_name(torch.get_autocast_dtype(device)) if enabled else None


def _enabled_backends() -> tuple[str, ...]:
    return tuple(name for name, enabled in _BACKEND_SWITCHES.items() if enabled())


def _forced() -> bool:
    return len(_enabled_backends()) < len(_BACKEND_SWITCHES)


class AttentionRecorder:
    """Appends an ``AttentionCall`` for each attention call of the traced forward.

    Plain SDPA calls are recorded by the Tracer as they are dispatched (``dispatched``): with the dtypes
    the kernel gets after autocast, and without a ``TorchFunctionMode``, whose mere presence changes code
    paths (``has_torch_function`` turns off ``nn.TransformerEncoderLayer``'s fast path). In a flash
    deployment the calls are recorded one level up instead (``function_mode``): flash-attn is not
    autocast-aware, so what matters is what the code hands over. So they are when ``sdpa_kernel`` forces
    backends the CPU build lacks (efficient, cuDNN): the CPU call then raises before any aten op.
    """

    def __init__(self, where: Callable[[], tuple[str, int]]) -> None:
        self.where = where  # (module path, ops recorded so far), from the Tracer
        self.calls: list[AttentionCall] = []
        self.at_function_level = _implementation.get() != SDPA or _forced()

    def function_mode(self) -> TorchFunctionMode | contextlib.AbstractContextManager[None]:
        """The mode to enter around the forward: records ``F.scaled_dot_product_attention`` calls in a flash
        deployment, nothing otherwise."""
        return _FunctionLevel(self) if self.at_function_level else contextlib.nullcontext()

    def dispatched(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """An aten attention op (``_scaled_dot_product_flash_attention_for_cpu``, ...) about to run."""
        if self.at_function_level:
            return  # recorded at the function level already
        fourth = args[3] if len(args) > 3 and isinstance(args[3], torch.Tensor) else None  # attn_mask / attn_bias
        self.record(*args[:3], mask=kwargs.get("attn_mask", fourth), autocast=None)

    def record(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, mask: object,
               autocast: str | None) -> None:
        module, index = self.where()
        self.calls.append(AttentionCall(
            index=index,
            module=module,
            implementation=_implementation.get(),
            query=dtype_name(query.dtype),
            key=dtype_name(key.dtype),
            value=dtype_name(value.dtype),
            mask=_dtype(mask),
            head_dim=query.shape[-1],
            enabled_backends=_enabled_backends(),
            autocast=autocast,
            refused=_refusal.get(),
        ))


class _FunctionLevel(TorchFunctionMode):
    def __init__(self, recorder: AttentionRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self._record(*args, **kwargs)
        return func(*args, **kwargs)

    def _record(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: object = None,
                *_: object, **__: object) -> None:
        self.recorder.record(query, key, value, mask=attn_mask, autocast=autocast_dtype(query.device.type))
