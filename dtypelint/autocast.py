"""Autocast as the deployment's device runs it, on the CPU that traces it.

Under ``torch.autocast`` the kernels receive other dtypes than the code passed: matmul-like ops run in the
autocast dtype, and on CUDA the ops of its float32 list (norms, softmax, exp, pow, reductions) upcast half
inputs to float32. CPU autocast has other lists, so a CPU trace under CPU autocast misses what CUDA hands a
kernel outside autocast's lists: float32 q/k out of an RMSNorm next to a bfloat16 v.

The lists are the installed torch's own (``registered_policy``): every aten op with a kernel for the
device's autocast dispatch key, sorted by running that kernel on fake tensors of the device (the CPU wheel
carries CUDA's autocast kernels). A torch release that moves an op (``rms_norm`` joined CUDA's float32 list
in 2.12) moves it here too; the report names the torch whose policy it applied.

``autocast_operands`` applies a device's policy itself, before the call (the tracer's function mode calls
it): it casts the eligible operands of a listed function, which the dispatch mode records as
``aten._to_copy`` ops that the tracer marks as autocast's, so the graph can tell "the code passed float32,
the kernel received bfloat16" and a report can say "autocast upcast this". It acts only while CPU autocast
is enabled (the audit's stand-in for the deployment's), and never on a call autocast was disabled for.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

_NAMESPACES = (torch, torch.Tensor, F, torch.linalg, torch.special)
# Operator spellings the function mode sees for a name: ``a @ b`` is ``Tensor.__matmul__``.
_SPELLINGS = {"matmul": ("__matmul__", "__rmatmul__"), "pow": ("__pow__", "__rpow__")}


def _callables(names: Iterable[str]) -> frozenset[Callable[..., Any]]:
    """Every Python entry point of these aten ops: ``torch.exp``, ``Tensor.exp``, ``F.softmax``,
    ``torch.linalg.vector_norm`` for ``linalg_vector_norm``, ..."""
    found = set()
    for name in names:
        for spelling in (name, *_SPELLINGS.get(name, ())):
            found.update(getattr(namespace, spelling) for namespace in _NAMESPACES if hasattr(namespace, spelling))
        for prefix, namespace in (("linalg_", torch.linalg), ("special_", torch.special)):
            if name.startswith(prefix) and hasattr(namespace, name.removeprefix(prefix)):
                found.add(getattr(namespace, name.removeprefix(prefix)))
    return frozenset(found)


@dataclass(frozen=True)
class AutocastPolicy:
    """The functions whose floating operands a device's autocast casts: ``lower`` to the autocast dtype,
    ``float32`` (half operands) to float32; ``torch_version``: the torch whose registrations these are,
    ``lower_ops`` / ``float32_ops``: the aten names."""

    device: str
    lower: frozenset[Callable[..., Any]]
    float32: frozenset[Callable[..., Any]]
    torch_version: str = ""
    lower_ops: frozenset[str] = frozenset()
    float32_ops: frozenset[str] = frozenset()
    # func -> whether it runs in float32: one lookup per torch call on the tracer's hot path.
    to_float32: dict[Callable[..., Any], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "to_float32", dict.fromkeys(self.lower, False) | dict.fromkeys(self.float32, True))


@functools.cache
def registered_policy(device: str) -> AutocastPolicy:
    """``device``'s autocast policy as the installed torch registers it: every aten op with a kernel for
    the ``Autocast<DEVICE>`` dispatch key, sorted by what that kernel does to a probe on fake ``device``
    tensors (the CPU wheel carries CUDA's autocast kernels; fake CUDA tensors run them): float32 operands
    that come out in the autocast dtype are its lower-precision list, half ones that come out float32 its
    float32 list. Ops that promote (``addcmul``, ``cat``) or that no probe can call are left to the op.

    The probes run in a thread of their own, whose dispatch modes, autocast state and warnings are its own:
    read in the middle of an audit's forward (autocast turned on inside it), they see none of its modes and
    leave nothing in its thread."""
    outcome: list[AutocastPolicy | BaseException] = []

    def read() -> None:
        try:
            outcome.append(_read_policy(device))
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            outcome.append(error)

    worker = threading.Thread(target=read, name=f"dtypelint-autocast-{device}")
    with _native_warnings_discarded():
        worker.start()
        worker.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _read_policy(device: str) -> AutocastPolicy:
    """The probes, in the worker thread: its autocast state is its own, so it is set once and left."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.set_autocast_enabled(device, True)
    torch.set_autocast_dtype(device, torch.bfloat16)
    key = getattr(torch._C.DispatchKey, f"Autocast{device.upper()}")
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # it logs every probe a meta kernel refuses
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    lower, float32 = set(), set()
    try:
        with FakeTensorMode(), torch._C._IncludeDispatchKeyGuard(key), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a probe of a deprecated op (torch.chain_matmul) warns
            for op in _registered_ops(device):
                kind = _probe(op, device)
                if kind is not None:
                    (float32 if kind == "float32" else lower).add(op.overloadpacket.__name__)
    finally:
        fake_log.setLevel(level)
    return AutocastPolicy(device, _callables(lower), _callables(float32), torch.__version__,
                          frozenset(lower), frozenset(float32))


@contextlib.contextmanager
def _native_warnings_discarded() -> Iterator[None]:
    """File descriptor 2 on /dev/null while the probes run: a kernel probed with made-up operands may print
    a C++ warning (``torch.lu is deprecated``) straight to it (a thread without Python's warning handler),
    which is no news of the user's model."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _registered_ops(device: str) -> list[torch._ops.OpOverload]:
    key = f"Autocast{device.upper()}"
    ops = []
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("aten::") or not torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
            continue
        packet, _, overload = name.removeprefix("aten::").partition(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)
        if op is not None:
            ops.append(op)
    return ops


_PROBE_RANKS = (2, 3, 4, 5)  # every dimension 4: a matmul, a norm over [4], a conv with a 4-wide kernel


def _probe(op: torch._ops.OpOverload, device: str) -> str | None:
    """``"lower"``, ``"float32"`` or None: what ``op``'s autocast kernel makes of float32 and of bfloat16
    operands, on the first operand shapes it accepts."""
    for rank in _PROBE_RANKS:
        from_float32 = _output_dtype(op, device, rank, torch.float32)
        if from_float32 is None:
            continue
        if from_float32 == torch.bfloat16:
            return "lower"
        return "float32" if _output_dtype(op, device, rank, torch.bfloat16) == torch.float32 else None
    return None


def _output_dtype(op: torch._ops.OpOverload, device: str, rank: int, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of ``op``'s first floating output, called (under ``_read_policy``'s fake mode and autocast)
    on tensors of ``dtype`` built from its schema; None where such a call raises."""
    args = _probe_arguments(op._schema, torch.empty((4,) * rank, device=device, dtype=dtype))
    if args is None:
        return None
    try:
        output = op(*args)
    except Exception:  # noqa: BLE001 - a probe the op's own checks refuse says nothing
        return None
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return next((out.dtype for out in outputs if isinstance(out, torch.Tensor) and out.is_floating_point()), None)


def _probe_arguments(schema: torch.FunctionSchema, tensor: torch.Tensor) -> list[Any] | None:
    """Positional arguments for every required parameter of ``schema``: ``tensor`` for a tensor, sizes of
    4, dimension 1, ones; None where a parameter has no probe value (a string, a generator)."""
    values: list[Any] = []
    for argument in schema.arguments:
        if argument.kwarg_only:
            if argument.has_default_value():
                continue
            return None
        if argument.has_default_value():
            break
        kind = str(argument.type)
        if kind.endswith("?"):
            values.append(None)
        elif kind == "Tensor":
            values.append(tensor)
        elif kind == "List[Tensor]":
            values.append([tensor, tensor])
        elif kind in ("List[int]", "List[SymInt]"):
            values.append([4])
        elif kind in ("int", "SymInt"):
            values.append(1)
        elif kind in ("float", "Scalar"):
            values.append(1.0)
        elif kind == "bool":
            values.append(False)
        else:
            return None
    return values


class _Policies(Mapping[str, AutocastPolicy]):
    """The policies by device, each read from torch's registrations when first asked for."""

    _DEVICES = ("cpu", "cuda")

    def __getitem__(self, device: str) -> AutocastPolicy:
        if device not in self:
            raise KeyError(device)
        return registered_policy(device)

    def __contains__(self, device: object) -> bool:  # without reading a policy, as Mapping's would
        return device in self._DEVICES

    def __iter__(self) -> Iterator[str]:
        return iter(self._DEVICES)

    def __len__(self) -> int:
        return len(self._DEVICES)


POLICIES: Mapping[str, AutocastPolicy] = _Policies()


def _eligible(value: Any, target: torch.dtype) -> bool:
    """Autocast casts floating tensors other than float64, and for float32 ops only half ones."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    if value.dtype in (torch.float64, target):
        return False
    return target != torch.float32 or value.dtype.itemsize < 4


def autocast_operands(device: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``func``'s arguments as ``device``'s policy casts them while CPU autocast (the deployment's stand-in)
    is on: the casts run here, before the call, so a dispatch mode records them as ``aten._to_copy`` ops.
    The policy is read from torch only once an audit runs under autocast."""
    if not torch.is_autocast_enabled("cpu"):
        return args, kwargs
    to_float32 = POLICIES[device].to_float32.get(func)
    # An explicit dtype= is what the op computes in.
    if to_float32 is None or kwargs.get("dtype") is not None:
        return args, kwargs
    target = torch.float32 if to_float32 else torch.get_autocast_dtype("cpu")
    return tree_map(lambda value: value.to(target) if _eligible(value, target) else value, (args, kwargs))
