"""What low precision costs rotary position embeddings (RoPE), measured: the fix reports it next to a cast
of ``inv_freq``, and DT107 next to rotary tables computed in half precision."""

from __future__ import annotations

import itertools
import math

import torch

# Positions are measured a chunk of about this many angles at a time: memory stays bounded (8 MB a
# tensor) at any context length a config declares.
_CHUNK_ANGLES = 2**20
# Real rotary widths have at most a few hundred frequencies; of a wider table (a config's absurd head size)
# only this many, those that storage rounds most, are measured: the worst error is theirs.
_MAX_FREQUENCIES = 1024
# cos and sin differ by 2 at most: once the worst error is this close to 2, later positions cannot change
# what is reported, so a context of a billion positions stops there.
_SATURATED = 2 - 2**-20


def rope_error(inv_freq: torch.Tensor, dtype: torch.dtype, positions: int, *, angles_in_dtype: bool = False) -> float:
    """Worst absolute error of cos/sin over ``positions`` when ``inv_freq`` is stored in ``dtype``
    (angles computed in float64 from either, so only the storage rounding is measured), and, with
    ``angles_in_dtype``, when the angles ``position * inv_freq`` are computed in ``dtype`` too."""
    exact = inv_freq.detach().double().flatten()
    rounded = inv_freq.detach().to(dtype).double().flatten()
    if exact.numel() > _MAX_FREQUENCIES:
        kept = (rounded - exact).abs().topk(_MAX_FREQUENCIES).indices
        exact, rounded = exact[kept], rounded[kept]
    step = max(1, _CHUNK_ANGLES // max(1, exact.numel()))
    last = (positions - 1) // step * step
    worst = 0.0
    # the last chunk first: its angles are the largest, so an overflow (NaN) is found before any early stop
    for start in itertools.chain([last] if positions > 0 else [], range(0, last, step)):
        position = torch.arange(start, min(start + step, positions), dtype=torch.float64)[:, None]
        exact_angle, rounded_angle = position * exact[None, :], position * rounded[None, :]
        if angles_in_dtype:
            rounded_angle = rounded_angle.to(dtype).double()
        chunk = max((exact_angle.cos() - rounded_angle.cos()).abs().max().item(),
                    (exact_angle.sin() - rounded_angle.sin()).abs().max().item())
        if math.isnan(chunk):  # angles past float16's range are inf: no cos/sin at all
            return chunk
        worst = max(worst, chunk)
        if worst >= _SATURATED:
            break
    return worst


def reference_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """The standard RoPE frequencies ``base ** (-2i / rotary_dim)`` in float32 (what a model's own
    ``inv_freq`` was before a cast rounded it: the rounded values alone cannot show their error)."""
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
