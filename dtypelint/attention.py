"""Attention calls as the kernel that will run them sees them: a function-level view of the trace.

A ``TorchDispatchMode`` sees SDPA only after its composite checks (a dtype mismatch raises before any aten
op exists) and after CPU dispatch chose a CPU kernel. What a CUDA kernel would get is decided one level up,
at ``F.scaled_dot_product_attention``: the query, key, value and mask the code hands it, the head_dim, the
backends ``sdpa_kernel`` leaves enabled, and autocast. ``AttentionRecorder`` (a ``TorchFunctionMode`` the
Tracer enters) records each call as an ``AttentionCall``.

A deployment that runs attention through flash-attn is declared with ``flash_deployment(name)``: while it
is active every attention call is recorded as a call of that implementation, the transformers attention
interface (through ``dtypelint.standins``) and direct SDPA calls (diffusers-style processors) alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dtypelint.dtypes import dtype_name

SDPA = "sdpa"
_implementation: ContextVar[str] = ContextVar("dtypelint_attention_implementation", default=SDPA)
# torch.backends.cuda's switches, which ``torch.nn.attention.sdpa_kernel`` sets (also on a CPU machine).
_BACKEND_SWITCHES = {
    "flash": torch.backends.cuda.flash_sdp_enabled,
    "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
    "cudnn": torch.backends.cuda.cudnn_sdp_enabled,
    "math": torch.backends.cuda.math_sdp_enabled,
}


@contextmanager
def flash_deployment(implementation: str) -> Iterator[None]:
    """Record every attention call inside the block as a call of ``implementation`` (``flash_attention_2``)."""
    token = _implementation.set(implementation)
    try:
        yield
    finally:
        _implementation.reset(token)


def is_flash(implementation: str) -> bool:
    return "flash" in implementation


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


class AttentionRecorder(TorchFunctionMode):
    """Append an ``AttentionCall`` for every ``F.scaled_dot_product_attention`` call, then run it."""

    def __init__(self, where: Callable[[], tuple[str, int]]) -> None:
        super().__init__()
        self.where = where  # (module path, ops recorded so far), from the Tracer
        self.calls: list[AttentionCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self._record(*args, **kwargs)
        return func(*args, **kwargs)

    def _record(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: object = None,
                *_: object, **__: object) -> None:
        module, index = self.where()
        self.calls.append(AttentionCall(
            index=index,
            module=module,
            implementation=_implementation.get(),
            query=dtype_name(query.dtype),
            key=dtype_name(key.dtype),
            value=dtype_name(value.dtype),
            mask=_dtype(attn_mask),
            head_dim=query.shape[-1],
            enabled_backends=tuple(name for name, enabled in _BACKEND_SWITCHES.items() if enabled()),
            autocast=autocast_dtype(query.device.type),
        ))
