"""Which kernel CUDA's ``F.scaled_dot_product_attention`` gives a call, and whether that kernel raises.

Measured on an H100 (torch 2.11, cuDNN 9.19; ``shared/reference/cuda-dtype-facts.md``, re-measured by
``benchmarks/cuda_probe.py``). The dispatcher tries flash, cuDNN, memory-efficient and math in that order
and takes the first eligible one; it never checks the memory-efficient kernel's mask dtype, so a float32
mask with a half query raises there instead of falling back. Forcing (``sdpa_kernel``) leaves only the
chosen backends, and a call none of them takes raises "No available kernel".

Calls that raise on every device (q/k/v of different dtypes, a mask of the other half dtype) are not
predicted here: the CPU forward raises too, and ``forward-error`` reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dtypelint.attention import AttentionCall

ORDER = ("flash", "cudnn", "efficient", "math")
HALF = ("float16", "bfloat16")
MAX_HEAD_DIM = 256  # flash and cuDNN: no kernel at head_dim 512


@dataclass(frozen=True)
class Dispatch:
    kernel: str | None  # None: no kernel takes the call
    error: str | None  # what CUDA raises, if it does
    passed_over: tuple[str, ...]  # why each earlier kernel was not taken


def _float_mask(call: AttentionCall) -> str | None:
    """The mask's dtype as the kernel gets it (autocast casts a floating mask too), None for none or bool."""
    if call.mask is None or call.mask == "bool":
        return None
    return call.autocast or call.mask


def _not_eligible(kernel: str, call: AttentionCall, dtype: str, forced: bool) -> str | None:
    """Why the dispatcher passes ``kernel`` over, or None when it takes it."""
    if kernel in ("flash", "cudnn"):
        if dtype not in HALF:
            return f"{kernel} takes only float16/bfloat16, the query is {dtype}"
        if call.head_dim > MAX_HEAD_DIM:
            return f"{kernel} has no kernel for head_dim {call.head_dim} (at most {MAX_HEAD_DIM})"
    if kernel == "flash" and call.mask is not None:
        return "flash takes no attention mask"
    mask = _float_mask(call)
    if kernel == "cudnn" and forced and mask not in (None, dtype):
        # Unforced, an fp16/bf16 call with a float32 mask runs at head_dim <= 256 (measured); forced, it raises.
        return f"cuDNN takes a bool mask or one of the query dtype, not {mask}"
    return None


def predict(call: AttentionCall) -> Dispatch | None:
    """The kernel CUDA picks for ``call`` and the error it raises; None for calls that raise everywhere."""
    dtype = call.autocast or call.query  # autocast casts q, k, v (and a float mask) to its dtype
    if call.autocast is None and len({call.query, call.key, call.value}) > 1:
        return None
    mask = _float_mask(call)
    if mask in HALF and mask != dtype:
        return None
    enabled = [kernel for kernel in ORDER if kernel in call.enabled_backends]
    passed_over = []
    for kernel in enabled:
        reason = _not_eligible(kernel, call, dtype, call.forced)
        if reason is None:
            return Dispatch(kernel, _raises(kernel, call, dtype), tuple(passed_over))
        passed_over.append(reason)
    return Dispatch(None, f"No available kernel (enabled: {', '.join(enabled) or 'none'})", tuple(passed_over))


def _raises(kernel: str, call: AttentionCall, dtype: str) -> str | None:
    mask = _float_mask(call)
    if kernel == "efficient" and mask not in (None, dtype):
        return (f"the memory-efficient kernel raises \"invalid dtype for bias - should match query's dtype\" "
                f"({mask} mask, {dtype} query)")
    return None
