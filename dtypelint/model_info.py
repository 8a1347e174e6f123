"""What the rules need to know about a model beyond the ops it ran: its modules, its parameters, buffers
and tensor attributes as they were when the trace started, and the config fields contracts ask about."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dtypelint.vocabulary import OriginKind


@dataclass(frozen=True)
class TensorInfo:
    """A parameter, buffer or plain tensor attribute of the model as it was when the trace started."""

    kind: OriginKind  # parameter, buffer or attribute
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: str
    persistent: bool = True
    requires_grad: bool = False


@dataclass
class ModelInfo:
    """What the rules need to know about the model beyond the ops it ran."""

    class_name: str
    modules: dict[str, str]
    tensors: dict[str, TensorInfo]
    aliases: dict[str, list[str]]
    keep_in_fp32_modules: list[str]
    model_type: str | None
    hidden_size: int | None = None
    head_dim: int | None = None
    max_positions: int | None = None  # config.max_position_embeddings: where RoPE's precision is judged
    # Modules' torch.dtype attributes (bitsandbytes' ``compute_dtype``), by qualified name.
    dtype_attributes: dict[str, torch.dtype] = field(default_factory=dict)
    # Submodules deployed in a dtype of their own on purpose (a pipeline's float32 text encoder), by name.
    module_dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    def intended_dtype(self, tensor: str, compute: torch.dtype) -> torch.dtype:
        """The dtype ``tensor`` is meant to be in: its submodule's own, where it has one, else ``compute``."""
        return next((dtype for prefix, dtype in self.module_dtypes.items() if tensor.startswith(prefix + ".")),
                    compute)

    @classmethod
    def of(cls, model: torch.nn.Module, modules: Sequence[tuple[str, torch.nn.Module]] | None = None) -> ModelInfo:
        """``modules``: ``model.named_modules()`` where the caller has walked them already."""
        modules = list(model.named_modules()) if modules is None else modules
        tensors: dict[str, TensorInfo] = {}
        dtype_attributes: dict[str, torch.dtype] = {}
        aliases: dict[str, list[str]] = {}
        seen: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                aliases.setdefault(seen[id(param)], []).append(name)
                continue
            seen[id(param)] = name
            tensors[name] = TensorInfo(
                OriginKind.PARAMETER, param.dtype, tuple(param.shape), str(param.device), True, param.requires_grad
            )
        for module_name, module in modules:
            non_persistent = module._non_persistent_buffers_set
            for buffer_name, buffer in module._buffers.items():
                if buffer is None:
                    continue
                name = qualified_name(module_name, buffer_name)
                tensors[name] = TensorInfo(
                    OriginKind.BUFFER, buffer.dtype, tuple(buffer.shape), str(buffer.device), buffer_name not in non_persistent
                )
            for attribute, value in vars(module).items():
                if isinstance(value, torch.Tensor):
                    name = qualified_name(module_name, attribute)
                    if name not in tensors:
                        tensors[name] = TensorInfo(OriginKind.ATTRIBUTE, value.dtype, tuple(value.shape), str(value.device))
                elif isinstance(value, torch.dtype):
                    dtype_attributes[qualified_name(module_name, attribute)] = value
        config = getattr(model, "config", None)
        # A pipeline's or wrapper's components bring their own (T5's ``wo`` inside a diffusers pipeline).
        keep = {kept for _, module in modules for kept in getattr(module, "_keep_in_fp32_modules", None) or ()}
        return cls(
            class_name=type(model).__name__,
            modules={name: type(module).__name__ for name, module in modules},
            tensors=tensors,
            aliases=aliases,
            keep_in_fp32_modules=sorted(keep),
            model_type=config_value(config, "model_type"),
            hidden_size=config_value(config, "hidden_size"),
            head_dim=_head_dim(config),
            max_positions=config_value(config, "max_position_embeddings"),
            dtype_attributes=dtype_attributes,
            module_dtypes=dict(getattr(model, "component_dtypes", None) or {}),
        )


def config_value(config: Any, name: str) -> Any:
    """``getattr(config, name, None)`` that also survives transformers 5's per-layer configs, which raise
    their own error (not an AttributeError) for a field that differs between layers."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError and kin
        return None


def _head_dim(config: Any) -> int | None:
    head_dim = config_value(config, "head_dim")
    if isinstance(head_dim, int):
        return head_dim
    hidden, heads = config_value(config, "hidden_size"), config_value(config, "num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def qualified_name(prefix: str, name: str) -> str:
    """``model.layers.0`` + ``weight`` -> ``model.layers.0.weight``; the root has no prefix."""
    return f"{prefix}.{name}" if prefix else name


def infer_compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype holding most parameter elements (float32 for a model without any)."""
    sizes: Counter[torch.dtype] = Counter()
    for param in model.parameters():
        if param.is_floating_point():
            sizes[param.dtype] += param.numel()
    return sizes.most_common(1)[0][0] if sizes else torch.float32
