"""CPU stand-ins for attention implementations that cannot run on the machine doing the audit.

A model meant to run with ``attn_implementation="flash_attention_2"`` cannot even call its attention on a
CPU box without ``flash_attn``. ``flash_standin(model, name)`` makes it traceable for the duration of the
traced forward only: it registers a stand-in under transformers' attention-function registry for ``name``,
points the model's config at it, and declares a flash deployment (``dtypelint.attention.flash_deployment``)
so that every attention call is recorded as a flash site. The stand-in hands q, k and v to SDPA (its
numerics) exactly as transformers' ``flash_attention_forward`` would hand them to the kernel: float32 is
cast to transformers' own target dtype, nothing else is. Everything is restored on exit; the model's
parameters and buffers are never touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from dtypelint.attention import flash_deployment, is_flash
from dtypelint.errors import UsageError, first_line
from dtypelint.model_info import config_value


def requested_flash(model: torch.nn.Module, requested: str | None = None) -> str | None:
    """The flash implementation the deployment uses: ``requested``, else the model config's own, if flash."""
    name = requested or config_value(getattr(model, "config", None), "_attn_implementation")
    return name if isinstance(name, str) and is_flash(name) else None


@contextmanager
def flash_standin(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """Trace ``model`` as if it ran ``implementation`` (a flash attention) on CUDA; see the module docs."""
    if not is_flash(implementation):
        raise UsageError(f"{implementation!r} is not a flash attention implementation")
    refuse_what_transformers_refuses(model, implementation)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        raise UsageError("auditing a flash attention deployment needs transformers >= 4.48 "
                         "(its attention-function registry)") from None
    with ExitStack() as stack:
        stack.enter_context(_registered(ALL_ATTENTION_FUNCTIONS, implementation, _flash_attention_standin))
        if implementation not in ALL_MASK_ATTENTION_FUNCTIONS:  # a kernels-hub name: flash's own masks
            stack.enter_context(_registered(ALL_MASK_ATTENTION_FUNCTIONS, implementation, flash_attention_mask))
        stack.enter_context(_attention_config(model, implementation))
        stack.enter_context(flash_deployment(implementation))
        yield


def refuse_what_transformers_refuses(model: torch.nn.Module, implementation: str) -> None:
    """A UsageError with transformers' own reason where it would not run ``implementation`` for this class
    (``T5ForConditionalGeneration does not support Flash Attention 2 yet``): a clean report of a deployment
    that cannot load would be false. Its check that flash_attn is installed is not ours to make: the
    stand-in runs without it."""
    version = re.fullmatch(r"flash_attention_(\d+)", implementation)
    check = getattr(model, "_flash_attn_can_dispatch", None)
    if version is None or check is None:
        return  # a hub kernel, or a transformers without the check
    try:
        check(int(version.group(1)), is_init_check=True)
    except ValueError as error:
        reason = first_line(error).split(". ")[0]  # "T5... does not support Flash Attention 2 yet"
        raise UsageError(f"{reason}: transformers refuses attn_implementation={implementation!r} for it") from None
    except ImportError:
        pass  # flash_attn is not installed here: the CPU stand-in is what runs


@contextmanager
def _registered(interface: Any, name: str, function: Any) -> Iterator[None]:
    """``function`` under ``name`` in a transformers registry (class-wide mapping) for the block only."""
    mapping = type(interface)._global_mapping
    missing = object()
    before = mapping.get(name, missing)
    mapping[name] = function
    try:
        yield
    finally:
        if before is missing:
            del mapping[name]
        else:
            mapping[name] = before


def _configs(config: Any) -> Iterator[Any]:
    """A config and its sub-configs (text_config, vision_config, ...), each once."""
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation_internal"):
            yield from _configs(sub)


@contextmanager
def _attention_config(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """The model's config (and sub-configs) set to ``implementation`` for the block, restored after."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation_internal"):
        yield  # not a transformers model: its direct SDPA calls are flash sites all the same
        return
    saved = [(each, each._attn_implementation_internal) for each in _configs(config)]
    config._attn_implementation = implementation
    try:
        yield
    finally:
        for each, value in saved:
            each._attn_implementation_internal = value


def _flash_attention_standin(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' ``flash_attention_forward`` with SDPA's CPU numerics in place of flash-attn's kernel."""
    from transformers.integrations.flash_attention import get_target_dtype
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    target = get_target_dtype(query, module)  # what transformers casts a float32 query (and k, v) to
    if target is not None:
        query, key, value = query.to(target), key.to(target), value.to(target)
    mask = _padding_as_causal_mask(attention_mask, query.shape[2], key.shape[2])
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling)


def _padding_as_causal_mask(padding: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor | None:
    """flash-attn takes padding as a 2-D (batch, kv_len) mask and applies causality itself; SDPA needs both
    in one boolean (batch, 1, q_len, kv_len) mask."""
    if padding is None or padding.dim() != 2:
        return padding
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=padding.device).tril(kv_len - q_len)
    return causal & padding[:, None, None, :].bool()
