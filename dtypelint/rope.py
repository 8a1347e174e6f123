"""What low precision costs rotary position embeddings (RoPE), measured: the fix reports it next to a cast
of ``inv_freq``, and DT107 next to rotary tables computed in half precision."""

from __future__ import annotations

import torch


def rope_error(inv_freq: torch.Tensor, dtype: torch.dtype, positions: int, *, angles_in_dtype: bool = False) -> float:
    """Worst absolute error of cos/sin over ``positions`` when ``inv_freq`` is stored in ``dtype``
    (angles computed in float64 from either, so only the storage rounding is measured), and, with
    ``angles_in_dtype``, when the angles ``position * inv_freq`` are computed in ``dtype`` too."""
    exact = inv_freq.detach().double()
    rounded = inv_freq.detach().to(dtype).double()
    position = torch.arange(positions, dtype=torch.float64)[:, None]
    exact_angle, rounded_angle = position * exact[None, :], position * rounded[None, :]
    if angles_in_dtype:
        rounded_angle = rounded_angle.to(dtype).double()
    return max(
        (exact_angle.cos() - rounded_angle.cos()).abs().max().item(),
        (exact_angle.sin() - rounded_angle.sin()).abs().max().item(),
    )


def reference_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """The standard RoPE frequencies ``base ** (-2i / rotary_dim)`` in float32 (what a model's own
    ``inv_freq`` was before a cast rounded it: the rounded values alone cannot show their error)."""
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
