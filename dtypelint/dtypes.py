"""Dtype names, parsing and ordering shared by every stage."""

from __future__ import annotations

import torch

from dtypelint.errors import UsageError

_ALIASES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """Turn a user-facing dtype (``"fp16"``, ``"torch.bfloat16"``, a ``torch.dtype``) into a dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).strip().lower().removeprefix("torch.")
    if key not in _ALIASES:
        known = ", ".join(sorted(_ALIASES))
        raise UsageError(f"unknown dtype {value!r}; expected one of: {known}")
    return _ALIASES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def wider(a: torch.dtype, b: torch.dtype) -> bool:
    """True when ``a`` holds every value of ``b`` and more (torch's promotion picks ``a``)."""
    return a != b and torch.promote_types(a, b) == a
