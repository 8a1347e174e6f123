"""Dtype names, parsing and ordering shared by every stage. Names are checked without importing torch, so
the command line refuses ``--dtype fp17`` before it pays for that import."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from dtypelint.errors import UsageError

if TYPE_CHECKING:
    import torch

# What users write -> the torch attribute it names.
_ALIASES: dict[str, str] = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}


def dtype_attribute(value: str, *, also: tuple[str, ...] = ()) -> str:
    """The torch attribute a user-facing dtype name (``"fp16"``, ``"torch.bfloat16"``) stands for; ``also``:
    the other words the caller takes (the command line's ``auto``), named in the error."""
    key = str(value).strip().lower().removeprefix("torch.")
    if key not in _ALIASES:
        known = ", ".join(sorted(_ALIASES) + list(also))
        raise UsageError(f"unknown dtype {value!r}; expected one of: {known}")
    return _ALIASES[key]


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """Turn a user-facing dtype (``"fp16"``, ``"torch.bfloat16"``, a ``torch.dtype``) into a dtype."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, dtype_attribute(value))


@functools.cache
def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (cached: rules and the graph ask for it per tensor)."""
    return str(dtype).removeprefix("torch.")


def wider(a: torch.dtype, b: torch.dtype) -> bool:
    """True when ``a`` holds every value of ``b`` and more (torch's promotion picks ``a``)."""
    import torch

    return a != b and torch.promote_types(a, b) == a
