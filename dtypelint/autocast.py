"""Autocast as the deployment's device runs it, on the CPU that traces it.

Under ``torch.autocast`` the kernels receive other dtypes than the code passed: matmul-like ops run in the
autocast dtype, and on CUDA the ops of its float32 list (norms, softmax, exp, pow, reductions) upcast half
inputs to float32. CPU autocast has the first list only, so a CPU trace under CPU autocast misses what CUDA
hands a kernel outside autocast's lists: float32 q/k out of a norm next to a bfloat16 v.

``autocast_operands`` applies a device's policy itself, before the call (the tracer's function mode calls
it): it casts the eligible operands of a listed function, which the dispatch mode records as
``aten._to_copy`` ops that the tracer marks as autocast's, so the graph can tell "the code passed float32,
the kernel received bfloat16" and a report can say "autocast upcast this". It acts only while CPU autocast
is enabled (the audit's stand-in for the deployment's), and never on a call autocast was disabled for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

_NAMESPACES = (torch, torch.Tensor, F, torch.linalg, torch.special)
# Operator spellings the function mode sees for a name: ``a @ b`` is ``Tensor.__matmul__``.
_SPELLINGS = {"matmul": ("__matmul__", "__rmatmul__"), "pow": ("__pow__", "__rpow__")}


def _callables(names: Iterable[str]) -> frozenset[Callable[..., Any]]:
    """Every Python entry point of these ops: ``torch.exp``, ``Tensor.exp``, ``F.softmax``, ..."""
    found = set()
    for name in names:
        for spelling in (name, *_SPELLINGS.get(name, ())):
            found.update(getattr(namespace, spelling) for namespace in _NAMESPACES if hasattr(namespace, spelling))
    return frozenset(found)


@dataclass(frozen=True)
class AutocastPolicy:
    """The functions whose floating operands a device's autocast casts: ``lower`` to the autocast dtype,
    ``float32`` (half operands) to float32."""

    device: str
    lower: frozenset[Callable[..., Any]]
    float32: frozenset[Callable[..., Any]]
    # func -> whether it runs in float32: one lookup per torch call on the tracer's hot path.
    to_float32: dict[Callable[..., Any], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "to_float32", dict.fromkeys(self.lower, False) | dict.fromkeys(self.float32, True))


# torch's own lists (aten/src/ATen/autocast_mode.h): the ops every autocast device runs in the lower
# precision, CUDA's additions, and CUDA's float32 list (including the ops autocast gives ``dtype=float32``).
_LOWER = ("linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "conv1d", "conv2d", "conv3d",
          "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention")
_CUDA_LOWER = ("einsum", "mv", "addmv", "addr", "chain_matmul", "multi_dot", "vecdot")
_CUDA_FLOAT32 = (
    "layer_norm", "group_norm", "softmax", "log_softmax", "exp", "expm1", "log", "log2", "log10", "log1p",
    "pow", "rsqrt", "reciprocal", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "softplus", "cumsum",
    "cumprod", "sum", "prod", "logsumexp", "cosine_similarity", "vector_norm", "matrix_norm", "cdist", "pdist",
    "dist", "renorm", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div",
    "binary_cross_entropy_with_logits", "cross_entropy",
)
POLICIES = {
    "cpu": AutocastPolicy("cpu", _callables(_LOWER), frozenset()),
    "cuda": AutocastPolicy("cuda", _callables(_LOWER + _CUDA_LOWER), _callables(_CUDA_FLOAT32)),
}


def _eligible(value: Any, target: torch.dtype) -> bool:
    """Autocast casts floating tensors other than float64, and for float32 ops only half ones."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    if value.dtype in (torch.float64, target):
        return False
    return target != torch.float32 or value.dtype.itemsize < 4


def autocast_operands(policy: AutocastPolicy, func: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``func``'s arguments as ``policy`` casts them while CPU autocast (the deployment's stand-in) is on:
    the casts run here, before the call, so a dispatch mode records them as ``aten._to_copy`` ops."""
    to_float32 = policy.to_float32.get(func)
    # An explicit dtype= is what the op computes in.
    if to_float32 is None or not torch.is_autocast_enabled("cpu") or kwargs.get("dtype") is not None:
        return args, kwargs
    target = torch.float32 if to_float32 else torch.get_autocast_dtype("cpu")
    return tree_map(lambda value: value.to(target) if _eligible(value, target) else value, (args, kwargs))
