"""Stage 2 of the pipeline: run one forward pass and record every aten op it dispatches.

The recorder is a ``TorchDispatchMode``: it sees ops *after* autocast and decomposition, so the dtypes it
records are the ones the kernels receive. Global module forward hooks keep a stack of module paths, so
each op is attributed to the module that ran it (the shape of ``torch.utils.module_tracker``). By default
nothing else is entered, so the forward takes the path it takes outside the audit: a ``TorchFunctionMode``
changes paths by its mere presence (``has_torch_function`` turns off ``nn.TransformerEncoderLayer``'s and
``nn.MultiheadAttention``'s fast paths). Only where the function level is needed (``function_level``: an
autocast policy to apply, attention calls to see before dispatch, a call that raised before dispatch) does
a small function mode apply the deployment's autocast policy, marking its casts, and record the composite
calls that raise before dispatch; a dtype error the model's own Python raises is recorded from its traceback.

The hot path only appends references; names, dtypes, shapes and the graph are derived afterwards
(``dtypelint.graph``), because formatting inside the mode multiplies its cost.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch._ops import OpOverload
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_leaves, tree_map

from dtypelint.attention import AttentionRecorder, autocast_dtype
from dtypelint.autocast import autocast_operands
from dtypelint.model_info import ModelInfo, infer_compute_dtype, qualified_name
from dtypelint.state import GlobalModes, has_values, settings_guarded
from dtypelint.vocabulary import WEIGHT_ORIGINS, OpKind, OriginKind, packets


@dataclass(frozen=True)
class Origin:
    """Where a leaf tensor comes from, and its qualified name (none for a constant)."""

    kind: OriginKind
    name: str | None = None


class TensorRecord:
    """A tensor as an op saw it. ``origin`` is None for a tensor an op produced."""

    __slots__ = ("dtype", "shape", "device", "origin", "stats", "stored_as")

    def __init__(self, tensor: torch.Tensor, origin: Origin | None) -> None:
        self.dtype = tensor.dtype
        try:
            self.shape = tensor.shape
        except RuntimeError:  # a nested tensor (TransformerEncoder's fast path with a padding mask) has none
            self.shape = _padded_shape(tensor)
        self.device = tensor.device
        self.origin = origin
        self.stats: tuple[float, float] | None = None
        self.stored_as: Origin | None = None  # the buffer or attribute the forward assigned this tensor to


def _padded_shape(nested: torch.Tensor) -> torch.Size:
    """The shape of a nested tensor padded to its largest component (``to_padded_tensor``'s)."""
    sizes = nested._nested_tensor_size()
    return torch.Size([sizes.shape[0], *sizes.amax(0).tolist()])


class OpRecord:
    """One dispatched op: its inputs as ``(argument, tensor index)`` pairs, recorded before it runs, and
    its output tensor indices, which stay ``None`` when the op raised. ``refused``: the kernel refused the
    dtypes it was given, and the trace went past it on operands cast to one dtype (``Tracer.go_past``)."""

    __slots__ = ("func", "module", "inputs", "outputs", "refused")

    def __init__(self, func: Any, module: str, inputs: list[tuple[str, int]]) -> None:
        self.func = func
        self.module = module
        self.inputs = inputs
        self.outputs: list[int] | None = None
        self.refused = False

    @property
    def completed(self) -> bool:
        return self.outputs is not None


class PythonCall:
    """Stands for an op in the graph: a function of the model's own code that raised a dtype error before
    handing its tensors to any op (xformers' and NATTEN's input checks). Its inputs are the tensors of the
    innermost frame of the traceback that holds any."""

    __slots__ = ("name",)

    class _Schema:
        is_mutable = False

    _schema = _Schema()

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def overloadpacket(self) -> PythonCall:
        return self

    def __str__(self) -> str:
        return f"python.{self.name}"


_CONSTANT = Origin(OriginKind.CONSTANT)
# Leaves measured with value statistics: what comes in, and the weights (half precision only, as every tensor).
MEASURED_LEAVES = frozenset({OriginKind.INPUT, *WEIGHT_ORIGINS})
# Words by which an exception of the model's own code says it is about dtypes.
_DTYPE_ERROR = re.compile(r"dtype|float|half|bfloat", re.IGNORECASE)
_PACKAGE_DIRECTORY = str(Path(__file__).parent)
_aten = torch.ops.aten
# Composite functions whose dtype checks can raise before any aten op reaches the dispatch mode (SDPA's q/k/v
# and mask, a convolution's input against its weight and bias), each with the aten op whose schema shares its
# argument order and that stands for the call in the graph. The others are here because backends refuse
# mixed operands in them before dispatch too; where their CPU kernels raise, the dispatched op is recorded.
_CHECKED_BEFORE_DISPATCH: dict[Callable[..., Any], OpOverload] = {
    F.scaled_dot_product_attention: _aten.scaled_dot_product_attention.default,
    F.conv1d: _aten.conv1d.default,
    F.conv2d: _aten.conv2d.default,
    F.conv3d: _aten.conv3d.default,
    F.conv_transpose1d: _aten.conv_transpose1d.default,
    F.conv_transpose2d: _aten.conv_transpose2d.input,
    F.conv_transpose3d: _aten.conv_transpose3d.input,
    F.linear: _aten.linear.default,
    F.layer_norm: _aten.layer_norm.default,
    F.group_norm: _aten.group_norm.default,
    F.rms_norm: _aten.rms_norm.default,
}
_ATTENTION = packets(OpKind.ATTENTION)
# Copies hold values measured where they were made; uninitialised memory holds garbage, not values.
_NOT_MEASURED = packets(OpKind.COPIES_VALUES) | packets(OpKind.UNINITIALISED)


class _Traits:
    """What the dispatch mode needs to know of an op, worked out once per op (``_TRAITS``, by ``id``: an
    OpOverload's own ``__hash__`` runs Python code)."""

    __slots__ = ("func", "metadata", "writes", "attention", "makes_values")

    def __init__(self, func: Any) -> None:
        self.func = func  # kept alive: its id is the key
        self.metadata = func.namespace == "prim"  # metadata queries (prim.device under fake tensors), not data ops
        self.writes = bool(_written_arguments(func))
        self.attention = func.overloadpacket in _ATTENTION
        # Views and data movement create no new values: their inputs were measured where they were made.
        # Uninitialised memory (aten.empty) holds garbage, not values.
        self.makes_values = not func.is_view and func.overloadpacket not in _NOT_MEASURED


_TRAITS: dict[int, _Traits] = {}


def _traits(func: Any) -> _Traits:
    _TRAITS[id(func)] = traits = _Traits(func)
    return traits


def iter_tensors(value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors in an op's argument or result, one container level deep, with their position."""
    if isinstance(value, torch.Tensor):
        yield "", value
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if isinstance(item, torch.Tensor):
                yield f"[{index}]", item


def value_extremes(tensor: torch.Tensor, *, any_width: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(min, max) of a real half-precision (or narrower) floating tensor, as tensors on its device: read
    back all at once after the forward (``Tracer.resolve_stats``), not with a device sync per op. NaN or
    inf in either means non-finite values. Wider tensors are measured only with ``any_width`` (what the
    forward returns): their range is not where dtypes put models at risk, and reading every float32
    activation again would double the cost of an audit."""
    if not tensor.is_floating_point() or (tensor.dtype.itemsize > 2 and not any_width) or tensor.numel() == 0:
        return None
    if not has_values(tensor):
        return None
    if tensor.is_nested:  # aminmax has no nested kernel: the components, all at once
        tensor = torch.cat([component.reshape(-1) for component in tensor.unbind()])
    return torch.aminmax(tensor.detach())


def needs_values(error: BaseException | None) -> bool:
    """True for the exceptions by which fake tensors refuse data-dependent or unsupported ops."""
    from torch._subclasses import fake_tensor

    limits = (
        fake_tensor.DataDependentOutputException,
        fake_tensor.DynamicOutputShapeException,
        fake_tensor.UnsupportedOperatorException,
    )
    return isinstance(error, limits) or "data-dependent" in str(error) or "meta tensor" in str(error)


def is_dtype_error(error: BaseException) -> bool:
    """True for an exception whose message is about dtypes (a kernel refusing a dtype or a mix of them)."""
    return bool(_DTYPE_ERROR.search(str(error)))


@functools.cache
def _written_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments an op writes (``Tensor(a!)``: in-place and ``out=``)."""
    return tuple(
        (position, argument.name)
        for position, argument in enumerate(func._schema.arguments)
        if argument.alias_info is not None and argument.alias_info.is_write
    )


class ModuleTracker:
    """The state-dict path of the innermost module running, kept by global forward pre/post hooks (the
    shape of ``torch.utils.module_tracker``). ``on_module`` is called as each module starts (a progress
    bar's update)."""

    def __init__(self, model: torch.nn.Module, on_module: Callable[[], object] | None = None,
                 modules: Sequence[tuple[str, torch.nn.Module]] | None = None) -> None:
        """``modules``: ``model.named_modules()`` where the caller has walked them already."""
        self._names = {id(module): name for name, module in (model.named_modules() if modules is None else modules)}
        self._root = model
        self.root_outputs: list[Any] = []  # what the model's forward returned, each time it returned
        self._stack: list[str] = [""]
        self._on_module = on_module
        self._hooks: list[Any] = []

    @property
    def current(self) -> str:
        return self._stack[-1]

    def name_of(self, module: object) -> str | None:
        """The path of one of the model's modules; None for anything else."""
        return self._names.get(id(module)) if isinstance(module, torch.nn.Module) else None

    def _push(self, module: torch.nn.Module, args: Any) -> None:
        # A module outside the model's tree (transformers' hub-kernel functions, ``Func`` modules since 5.25)
        # runs as part of the module that called it.
        self._stack.append(self._names.get(id(module), self._stack[-1]))
        if self._on_module is not None:
            self._on_module()

    def _pop(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if len(self._stack) > 1:
            self._stack.pop()
        if module is self._root:
            self.root_outputs.append(output)

    def __enter__(self) -> ModuleTracker:
        hooks = torch.nn.modules.module
        self._hooks = [
            hooks.register_module_forward_pre_hook(self._push),
            hooks.register_module_forward_hook(self._pop, always_call=True),
        ]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


class Tracer(TorchDispatchMode):
    """Record the ops of whatever runs inside ``with Tracer(model):``.

    Leaves nothing behind: the global hooks are removed and the process settings (grad mode, the default
    dtype and device, autocast, ...: ``dtypelint.state.PROCESS_SETTINGS``) are restored on exit, also when
    the forward raises. The model itself is never touched. Past ``max_ops`` ops nothing more is recorded,
    only counted (``ops_run``), so a huge forward cannot exhaust memory.
    In-place writes to the model's parameter storage (``w.data.add_``) are noted in
    ``written_parameters``.

    Function-level recording is entered only where it is needed (``function_level`` says why: CPU autocast
    is on, whose policy it applies, or attention calls are recorded before dispatch), or where the caller
    asks (``function_level=REASON``). A trace without it that shows it was needed says so in
    ``wants_function_level`` (a call raised before dispatch, autocast was turned on inside the forward):
    ``dtypelint.pipeline`` then traces the forward again with it.

    ``go_past``: how many kernels that refuse a mix of dtypes the trace goes past, so that one run finds the
    errors behind the first. A refused op is recorded as it was called, marked ``refused``, and run again on
    its floating operands cast to the dtype its module is meant to compute in (``compute_dtype`` or the
    component's own; default: the dtype of most parameter elements); ``refusals`` keeps each exception, the
    first is the one the deployment raises.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        stats: bool = False,
        state: Mapping[str, torch.Tensor] | None = None,
        on_module: Callable[[], object] | None = None,
        max_ops: int | None = None,
        autocast_device: str = "cpu",
        function_level: str | None = None,
        go_past: int = 0,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.go_past = go_past
        self._asked_dtype = compute_dtype
        self.refusals: list[Exception] = []
        self._paused = False  # running a refused op again on cast operands: recorded as the refused one
        self.function_level = function_level
        self.wants_function_level: str | None = None
        self.stats = stats
        self.max_ops = sys.maxsize if max_ops is None else max_ops
        self.ops_run = 0
        self.written_parameters: set[str] = set()
        self.records: list[OpRecord] = []
        self.tensors: list[TensorRecord] = []
        self.origins: dict[int, Origin] = {}
        self._walked = list(model.named_modules())  # the module tree, walked once per trace
        self.model_info = ModelInfo.of(model, self._walked)
        # Origin tensors stay referenced so their ids cannot be reused during the trace. Activations are
        # not kept alive (that would defeat the allocator's reuse): a weak reference guards their ids.
        self._keepalive: list[torch.Tensor] = []
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self._extremes: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # measured, not yet read back
        self._on_module = on_module
        self.modules = ModuleTracker(model, self._module_started, self._walked)
        self._saved_modes: GlobalModes | None = None
        self.attention = AttentionRecorder(lambda: (self.modules.current, len(self.records)))
        self.autocast: str | None = None  # the autocast dtype the forward started under, if any
        self._function_modes = ExitStack()
        self.failure_module: str | None = None  # where the forward's exception unwound from, if it raised
        self.returned: set[int] = set()  # indices of the tensors the forward returned
        self.autocast_device = autocast_device  # whose autocast policy applies (read when first needed)
        # The ops that are casts autocast made (the dtype the code passed -> the one the kernel received).
        self.autocast_casts: list[range] = []
        self._function_calls = _FunctionCalls(self)
        self.failed_before_dispatch = False  # the function mode recorded a composite call that raised
        # Storage of the real parameters, to catch writes through ``.data`` (which no version counter sees).
        self._parameter_storages = {} if state is not None else _parameter_storages(model)
        self._register_model_origins(state)

    def _register_model_origins(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """``state`` replaces the model's own tensors when the forward runs on substitutes (meta mode)."""
        if state is None:
            state = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        for name, tensor in state.items():
            info = self.model_info.tensors.get(name)
            self._add_origin(tensor, Origin(info.kind if info else OriginKind.PARAMETER, name))
        for module_name, module in self._walked:
            for attribute, value in vars(module).items():
                if isinstance(value, torch.Tensor):
                    self._add_origin(value, Origin(OriginKind.ATTRIBUTE, qualified_name(module_name, attribute)))

    def _add_origin(self, tensor: torch.Tensor, origin: Origin) -> None:
        if id(tensor) not in self.origins:
            self.origins[id(tensor)] = origin
            self._keepalive.append(tensor)

    def add_inputs(self, args: tuple, kwargs: Mapping[str, Any], names: list[str]) -> None:
        """Name the forward's tensor arguments, however deeply nested (``past_key_values[0][1]``), so they
        appear as ``input`` leaves."""
        named = {names[position] if position < len(names) else f"arg{position}": value
                 for position, value in enumerate(args)} | dict(kwargs)
        for name, value in named.items():
            for path, leaf in tree_flatten_with_path(value)[0]:
                if isinstance(leaf, torch.Tensor):
                    self._add_origin(leaf, Origin(OriginKind.INPUT, name + keystr(path)))

    def _recorded(self, tensor: object) -> int | None:
        """The index of the tensor record this object currently stands for, if the trace has one: not one of
        another dtype (a parameter whose ``.data`` the forward replaced: ``vae.to(torch.float32)`` in a
        pipeline's call is the same Parameter with new data)."""
        entry = self._live.get(id(tensor))
        if entry is None or entry[1]() is not tensor or self.tensors[entry[0]].dtype != tensor.dtype:
            return None
        return entry[0]

    def _index(self, tensor: torch.Tensor) -> int:
        """The index of the tensor record this object currently stands for, creating a leaf if new."""
        recorded = self._recorded(tensor)
        if recorded is not None:
            return recorded
        origin = self.origins.get(id(tensor), _CONSTANT)
        index = self._new(tensor, origin)
        if self.stats and origin.kind in MEASURED_LEAVES:  # a weight's range can be what overflows (DT103)
            self._measure(index, tensor)
        return index

    def _measure(self, index: int, tensor: torch.Tensor, *, any_width: bool = False) -> None:
        extremes = value_extremes(tensor, any_width=any_width)
        if extremes is not None:
            self._extremes.append((index, *extremes))

    def resolve_stats(self) -> None:
        """Read back the measured extremes, one transfer per dtype and device."""
        groups: dict[tuple[torch.dtype, torch.device], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for entry in self._extremes:
            groups.setdefault((entry[1].dtype, entry[1].device), []).append(entry)
        for (_, device), entries in groups.items():
            with torch.autocast(device.type, enabled=False):  # stack is on autocast's promote list
                values = torch.stack([torch.stack(pair) for _, *pair in entries]).tolist()
            for (index, _, _), (low, high) in zip(entries, values, strict=True):
                self.tensors[index].stats = (low, high)
        self._extremes = []

    def _new(self, tensor: torch.Tensor, origin: Origin | None) -> int:
        index = len(self.tensors)
        self.tensors.append(TensorRecord(tensor, origin))
        self._live[id(tensor)] = (index, weakref.ref(tensor))
        return index

    def _inputs(self, args: tuple, kwargs: Mapping[str, Any]) -> list[tuple[str, int]]:
        inputs = []
        for position, value in enumerate(args):
            if isinstance(value, torch.Tensor):  # the common case, without the generator
                inputs.append((str(position), self._index(value)))
            elif isinstance(value, (list, tuple)):
                inputs += [(f"{position}{suffix}", self._index(tensor)) for suffix, tensor in iter_tensors(value)]
        for name, value in kwargs.items():
            inputs += [(name + suffix, self._index(tensor)) for suffix, tensor in iter_tensors(value)]
        return inputs

    def failed_call(self, op: OpOverload, args: tuple, kwargs: Mapping[str, Any],
                    recorded_before: int) -> OpRecord | None:
        """A composite call (``F.conv2d``) raised: record it as a failed ``op`` and return the record, unless
        one of the aten ops it dispatched is the one that failed (it was recorded with the dtypes the kernel
        got)."""
        if self.ops_run > self.max_ops or (len(self.records) > recorded_before and not self.records[-1].completed):
            return None
        record = OpRecord(op, self.modules.current, self._inputs(args, kwargs))
        self.records.append(record)
        self.failed_before_dispatch = True
        return record

    @property
    def function_level_recorded(self) -> bool:
        """Whether the function mode recorded what the dispatch level cannot: autocast casts, or a composite
        call that raised before dispatch."""
        return bool(self.autocast_casts) or self.failed_before_dispatch

    def _module_started(self) -> None:
        if self.function_level is None and self.wants_function_level is None and autocast_dtype("cpu"):
            self.wants_function_level = "to apply the autocast policy to the autocast the forward turns on"
        if self._on_module is not None:
            self._on_module()

    def function_level_note(self) -> str | None:
        """What the report says where function-level recording was on in a model with modules whose path
        depends on it."""
        if self.function_level is None:
            return None
        checking = function_mode_dependent(self.model)
        if not checking:
            return None
        shown = ", ".join(f"{name or '<model>'} ({kind})" for name, kind in checking[:3])
        more = f" and {len(checking) - 3} more" if len(checking) > 3 else ""
        return (f"function-level recording was on ({self.function_level}); modules whose forward checks for it "
                "(torch.overrides.has_torch_function) may have left the fast path they take outside the audit: "
                f"{shown}{more}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        traits = _TRAITS.get(id(func)) or _traits(func)
        if traits.metadata or self._paused:
            return func(*args, **kwargs)
        self.ops_run += 1
        if self.ops_run > self.max_ops:
            return func(*args, **kwargs)
        if traits.writes and self._parameter_storages:
            self._note_parameter_writes(func, args, kwargs)
        if traits.attention:
            self.attention.dispatched(args, kwargs)
        record = OpRecord(func, self.modules.current, self._inputs(args, kwargs))
        self.records.append(record)
        try:
            outputs = func(*args, **kwargs)
        except RuntimeError as error:
            outputs = self.run_past(func, args, kwargs, record, error, writes=traits.writes)
        measure = self.stats and traits.makes_values
        if isinstance(outputs, torch.Tensor):
            index = self._new(outputs, None)
            if measure:
                self._measure(index, outputs)
            record.outputs = [index]
            return outputs
        produced = []
        for _, tensor in iter_tensors(outputs):
            index = self._new(tensor, None)
            if measure:
                self._measure(index, tensor)
            produced.append(index)
        record.outputs = produced
        return outputs

    def run_past(self, func: Any, args: tuple, kwargs: Mapping[str, Any], record: OpRecord,
                 error: Exception, *, writes: bool = False) -> Any:
        """The outputs of ``func``, which refused the dtypes ``record`` holds, on its floating operands cast
        to the dtype its module is meant to compute in, run unrecorded; or ``error`` raised again where the
        trace does not go past it: past the budget, an error not about dtypes, an op that writes (``writes``), or
        operands none of which has that dtype."""
        floating = {leaf.dtype for leaf in tree_leaves((args, kwargs))
                    if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()}
        target = self.model_info.intended_dtype(record.module + ".", self._compute_dtype)
        if (len(self.refusals) >= self.go_past or writes or not is_dtype_error(error) or len(floating) < 2
                or target not in floating):
            raise error

        def cast(value: Any) -> Any:
            return value.to(target) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        self._paused = True
        try:
            outputs = func(*tree_map(cast, args), **tree_map(cast, kwargs))
        finally:
            self._paused = False
        self.refusals.append(error)
        record.refused = True
        return outputs

    @functools.cached_property
    def _compute_dtype(self) -> torch.dtype:
        return self._asked_dtype or infer_compute_dtype(self.model)

    def _note_parameter_writes(self, func: Any, args: tuple, kwargs: Mapping[str, Any]) -> None:
        for position, name in _written_arguments(func):
            value = args[position] if position < len(args) else kwargs.get(name)
            for _, tensor in iter_tensors(value):
                if has_values(tensor):
                    written = self._parameter_storages.get(tensor.untyped_storage().data_ptr())
                    if written is not None:
                        self.written_parameters.add(written)

    def __enter__(self) -> Tracer:
        self._saved_modes = None if settings_guarded() else GlobalModes.capture()  # once per forward
        self.autocast = autocast_dtype("cuda") or autocast_dtype("cpu")
        self.function_level = self.function_level or self._function_level_needed()
        self.modules.__enter__()
        self._function_modes = ExitStack()
        if self.function_level is not None:
            # A function mode entered later sees a call first: the attention recorder sees what the code hands
            # over (flash-attn ignores autocast), the tracer's own mode what autocast makes of it.
            self._function_modes.enter_context(self._function_calls)
            self._function_modes.enter_context(self.attention.function_mode())
        return super().__enter__()

    def _function_level_needed(self) -> str | None:
        """Why the forward needs function-level recording from the start, if it does."""
        if autocast_dtype("cpu"):
            return f"to apply the {self.autocast_device} autocast policy"
        if self.attention.at_function_level:
            return "to record attention calls as the code hands them over"
        return None

    def __exit__(self, exc_type, exc, traceback) -> None:  # noqa: ANN001
        try:
            super().__exit__(exc_type, exc, traceback)
            self.resolve_stats()
            self._note_returned_tensors()
            self._note_stored_tensors()
            if exc is not None:
                self._note_failure(exc)
        finally:
            self._function_modes.__exit__(exc_type, exc, traceback)
            self.modules.__exit__(exc_type, exc, traceback)
            if self._saved_modes is not None:
                self._saved_modes.restore()

    def _note_stored_tensors(self) -> None:
        """Name the tensors the forward made and assigned to a buffer or tensor attribute (timm rebuilds
        ``self.rel_indices`` for a new input size): the table then carries the buffer's name."""
        for module_name, module in self._walked:
            attributes = [(OriginKind.ATTRIBUTE, key, value) for key, value in vars(module).items()]
            for kind, attribute, value in [*((OriginKind.BUFFER, *item) for item in module._buffers.items()), *attributes]:
                index = self._recorded(value)
                if index is not None and self.tensors[index].origin is None:
                    self.tensors[index].stored_as = Origin(kind, qualified_name(module_name, attribute))

    def _note_returned_tensors(self) -> None:
        """Mark the tensors the model's forward returned (in ``ModelOutput`` and tuples, at any depth) and,
        with statistics, measure them whatever their dtype: whether inf or NaN reaches the output is then a
        fact, not an inference through unmeasured float32 ops."""
        for leaf in tree_leaves(self.modules.root_outputs):
            index = self._recorded(leaf)
            if index is None or index in self.returned:
                continue
            self.returned.add(index)
            if self.stats and self.tensors[index].stats is None:
                self._measure(index, leaf, any_width=True)
        self.resolve_stats()

    def _note_failure(self, error: BaseException) -> None:
        """Locate an exception the model's own Python code raised: ``failure_module`` is the innermost module
        whose forward the traceback passes through and, for a dtype error raised outside any op, the frame's
        tensors are recorded as the inputs of a failed ``PythonCall``."""
        frames = _model_frames(error)
        self.failure_module = next(
            (self.modules.name_of(frame.f_locals["self"]) for frame in reversed(frames)
             if self.modules.name_of(frame.f_locals.get("self")) is not None), None)
        if (self.records and not self.records[-1].completed) or self.ops_run > self.max_ops:
            return  # an op raised: it is recorded with the dtypes its kernel got
        if not is_dtype_error(error):
            return
        if self.function_level is None:
            self.wants_function_level = "to record the call that raised before dispatch"
        for frame in reversed(frames):
            tensors = _frame_tensors(frame)
            if tensors:
                inputs = [(name, self._index(tensor)) for name, tensor in tensors]
                module = self.failure_module if self.failure_module is not None else self.modules.current
                self.records.append(OpRecord(PythonCall(frame.f_code.co_name), module, inputs))
                return

    def upstream_modules(self, tensor: torch.Tensor) -> list[str]:
        """The modules of the ops ``tensor`` was computed from, nearest first (a pipeline names the component
        whose output it passed on through its own ``repeat``/``view``/``cat``)."""
        index = self._recorded(tensor)
        if index is None:
            return []
        producers = {output: record for record in self.records for output in record.outputs or ()}
        seen, queue, modules = {index}, deque([index]), []
        while queue:
            record = producers.get(queue.popleft())
            if record is None:
                continue
            if record.module:
                modules.append(record.module)
            for _, source in record.inputs:
                if source not in seen:
                    seen.add(source)
                    queue.append(source)
        return modules

    def release(self) -> None:
        """Drop the references the trace holds to the model's tensors (call once the graph is built)."""
        self._keepalive = []
        self._live = {}
        self.origins = {}


class _FunctionCalls(TorchFunctionMode):
    """The tracer's view of function calls, where it needs one (``Tracer.function_level``). It applies the
    deployment's autocast policy (``dtypelint.autocast``) and marks the casts it makes; and it catches the
    composite calls that raise before the dispatch mode sees any op (``_CHECKED_BEFORE_DISPATCH``), so that
    DT001 and DT101 see the failing call with the operands its kernel got. Every other call costs two set
    lookups and records nothing: the graph stays the dispatched ops."""

    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        tracer = self.tracer
        first = len(tracer.records)
        args, kwargs = autocast_operands(tracer.autocast_device, func, args, kwargs)
        recorded_before = len(tracer.records)
        if recorded_before > first:
            tracer.autocast_casts.append(range(first, recorded_before))
        op = _CHECKED_BEFORE_DISPATCH.get(func)
        if op is None:
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except Exception as error:
            record = tracer.failed_call(op, args, kwargs, recorded_before)
            if record is None:
                raise
            outputs = tracer.run_past(func, args, kwargs, record, error)
            record.outputs = [tracer._new(tensor, None) for _, tensor in iter_tensors(outputs)]
            return outputs


def function_mode_dependent(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(path, class) of the modules whose forward asks whether torch function handling is active
    (``nn.TransformerEncoderLayer``'s and ``nn.MultiheadAttention``'s fast paths): a function mode sends them
    down another path than the deployment's."""
    return [(name, type(module).__name__) for name, module in model.named_modules()
            if _asks_for_torch_function(type(module))]


@functools.cache
def _asks_for_torch_function(module_class: type) -> bool:
    code = getattr(inspect.unwrap(module_class.forward), "__code__", None)
    return code is not None and any(name.startswith("has_torch_function") for name in code.co_names)


def _model_frames(error: BaseException) -> list[FrameType]:
    """The frames of ``error``'s traceback below dtypelint's own, outermost first."""
    frames, traceback = [], error.__traceback__
    while traceback is not None:
        if not traceback.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIRECTORY):
            frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    return frames


def _frame_tensors(frame: FrameType) -> list[tuple[str, torch.Tensor]]:
    """The tensors a frame's locals hold, and those one attribute deep in plain objects (xformers checks
    an ``Inputs`` object's ``query``, ``key`` and ``value``)."""
    tensors = []
    for name, value in frame.f_locals.items():
        if isinstance(value, torch.Tensor):
            tensors.append((name, value))
        elif not isinstance(value, (torch.nn.Module, type)) and hasattr(value, "__dict__"):
            tensors += [(f"{name}.{key}", item) for key, item in vars(value).items() if isinstance(item, torch.Tensor)]
    return tensors


def _parameter_storages(model: torch.nn.Module) -> dict[int, str]:
    storages = {
        parameter.untyped_storage().data_ptr(): name
        for name, parameter in model.named_parameters()
        if has_values(parameter)
    }
    storages.pop(0, None)  # empty tensors share the null pointer
    return storages


@dataclass
class TraceResult:
    """The outcome of a traced forward: the recorder, the exception if the forward raised, notes."""

    tracer: Tracer
    error: BaseException | None = None
    fake: bool = False
    notes: list[str] = field(default_factory=list)
    torch_log: list[str] = field(default_factory=list)  # what torch logged while the forward ran (fake kernels)
    step_starts: list[int] = field(default_factory=list)  # the first op of each decode step after the first call
    step_name: str = "decode step"  # what a later call is: "call" for a model called again as it was (a pipeline)
