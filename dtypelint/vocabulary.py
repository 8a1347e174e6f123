"""The words every stage shares: where a tensor comes from, and what an aten op means to a dtype linter.

Op kinds are registered on ``torch.ops.aten`` packets, as ``torch.utils.flop_counter`` registers its
formulas: ``kinds_of(torch.ops.aten.mm)`` is ``{OpKind.ONE_DTYPE}``. A name that this torch does not
have is skipped, so the table serves older and newer torch alike.
"""

from __future__ import annotations

from enum import Enum, StrEnum

import torch
from torch._ops import OpOverloadPacket


class OriginKind(StrEnum):
    """Where a tensor of the graph comes from. Leaves have every kind but ``OP``."""

    PARAMETER = "parameter"
    BUFFER = "buffer"
    ATTRIBUTE = "attribute"  # a plain tensor attribute of a module
    INPUT = "input"  # a forward argument
    CONSTANT = "constant"  # created inside forward
    OP = "op"  # produced by an op


LEAF_ORIGINS = frozenset(OriginKind) - {OriginKind.OP}
WEIGHT_ORIGINS = frozenset({OriginKind.PARAMETER, OriginKind.BUFFER, OriginKind.ATTRIBUTE})
CASTABLE_ORIGINS = frozenset({OriginKind.PARAMETER, OriginKind.BUFFER})  # what a fix can cast in place
STREAM_ORIGINS = frozenset({OriginKind.OP, OriginKind.INPUT})  # activations, as opposed to weights


class OpKind(Enum):
    VIEW = "re-views or re-labels its input: following it keeps the identity of what flows"
    COPIES_VALUES = "its output holds values of its inputs (gather, cat, pad, ...)"
    CONCATENATES = "joins several inputs"
    UNINITIALISED = "allocates memory without values"
    CAST = "changes the dtype on purpose: never a conflict by itself"
    FILL = "writes a value the code chose (a mask's -inf), not one computed from inputs"
    ONE_DTYPE = "needs all its floating inputs in one dtype (matmul family, convolution, attention)"
    ATTENTION = "scaled-dot-product attention"
    SENSITIVE = "numerically sensitive in half precision"
    REDUCTION = "reduces many elements to few"
    NARROWER_IN_META = "its meta function accepts fewer dtypes than its kernels"

    # Members are singletons compared by identity: hash them so too. Enum's own __hash__ is Python code,
    # and `kind in kinds` runs ten thousand times in a launch-bound audit.
    __hash__ = object.__hash__


_KINDS: dict[OpOverloadPacket, frozenset[OpKind]] = {}
_NO_KINDS: frozenset[OpKind] = frozenset()


def register(kind: OpKind, *names: str) -> None:
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            _KINDS[packet] = _KINDS.get(packet, _NO_KINDS) | {kind}


def kinds_of(packet: OpOverloadPacket) -> frozenset[OpKind]:
    return _KINDS.get(packet, _NO_KINDS)


def packets(kind: OpKind) -> frozenset[OpOverloadPacket]:
    return frozenset(packet for packet, kinds in _KINDS.items() if kind in kinds)


register(
    OpKind.VIEW, "t", "view", "_unsafe_view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze",
    "slice", "select", "alias", "detach", "clone", "contiguous", "lift_fresh", "as_strided", "split",
    "split_with_sizes", "chunk", "unbind", "flatten", "repeat",
)
register(
    OpKind.COPIES_VALUES, "cat", "stack", "index", "index_select", "gather", "embedding", "clone", "contiguous",
    "repeat", "expand_copy", "slice_scatter", "select_scatter", "constant_pad_nd", "tril", "triu", "flip", "roll",
)
register(OpKind.CONCATENATES, "cat", "stack")
register(OpKind.UNINITIALISED, "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
         "empty_permuted")
register(OpKind.CAST, "_to_copy", "to", "copy_", "copy", "_to_dtype")
register(OpKind.FILL, "masked_fill", "masked_fill_", "fill", "fill_", "index_fill", "index_fill_", "full_like",
         "new_full")
ATTENTION_OPS = (
    "scaled_dot_product_attention", "_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
register(OpKind.ATTENTION, *ATTENTION_OPS)
register(
    OpKind.ONE_DTYPE, "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "addr", "mv", "dot", "vdot", "matmul",
    "linear", "_addmm_activation", "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "embedding_bag",
    "_embedding_bag", *ATTENTION_OPS,
)
register(
    OpKind.SENSITIVE, "_softmax", "softmax", "_log_softmax", "log_softmax", "exp", "cumsum", "cumprod", "logsumexp",
    "var", "var_mean", "std", "std_mean", "linalg_vector_norm", "norm",
)
register(OpKind.REDUCTION, "sum", "mean", "prod")
# torch's meta aten._grouped_mm takes only bfloat16, its CPU kernel float16 too (mixture-of-experts layers).
register(OpKind.NARROWER_IN_META, "_grouped_mm")
