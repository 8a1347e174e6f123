"""Leave nothing behind: snapshot what a forward may change, and put it back afterwards.

A forward can update buffers (BatchNorm's running statistics in ``train()``, EMA and step counters,
``spectral_norm``'s ``u``/``v``), replace or delete buffers and tensor attributes, flip ``training``
flags and ``requires_grad``, fill ``.grad`` by a backward of its own, flip process-wide settings
(``PROCESS_SETTINGS``: autocast, the default dtype and device, matmul precision, ``os.environ``, ...),
and draw from the global random generators. Every forward dtypelint runs goes through
``preserved(model)``, which restores all of that, also when the forward raises, and gets copies of
the caller's input tensors (``fresh_copies``). Parameters are not copied (they are the bulk of the
memory): their ``_version`` counters and storages reveal an in-place write, which is reported since it
cannot be undone; so do gradients'.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.modules.lazy import LazyModuleMixin
from torch.utils._pytree import tree_map_only

from dtypelint.errors import UsageError

_MISSING = object()
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu")


def _autocast_devices() -> tuple[str, ...]:
    privateuse1 = torch._C._get_privateuse1_backend_name()
    return AUTOCAST_DEVICES + (privateuse1,) if privateuse1 not in AUTOCAST_DEVICES else AUTOCAST_DEVICES


def _autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    """Autocast's enabled flag and dtype per device type this torch knows."""
    states = {}
    for device in _autocast_devices():
        try:
            states[device] = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        except (RuntimeError, TypeError, ValueError, AttributeError):  # unknown device, or torch < 2.4
            continue
    if not states:  # torch < 2.4: no per-device API
        states["cpu"] = (torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype())
        states["cuda"] = (torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype())
    return states


def _set_autocast(device: str, enabled: bool, dtype: torch.dtype) -> None:
    try:
        torch.set_autocast_enabled(device, enabled)
        torch.set_autocast_dtype(device, dtype)
    except TypeError:  # torch < 2.4
        if device == "cpu":
            torch.set_autocast_cpu_enabled(enabled)
            torch.set_autocast_cpu_dtype(dtype)
        else:
            torch.set_autocast_enabled(enabled)
            torch.set_autocast_gpu_dtype(dtype)


def _restore_autocast(saved: dict[str, tuple[bool, torch.dtype]]) -> None:
    for device, (enabled, dtype) in saved.items():
        _set_autocast(device, enabled, dtype)


@dataclass(frozen=True)
class ProcessSetting:
    """A process-wide setting a forward may change: named by the API that sets it, read by ``get``, put
    back by ``set`` (called only when the value differs)."""

    name: str
    get: Callable[[], Any]
    set: Callable[[Any], None]


def _at(path: str) -> Any:
    """What a dotted path names, from an imported module (AttributeError where this torch lacks it)."""
    root, *names = path.split(".")
    return functools.reduce(getattr, names, sys.modules[root])


def _calls(setter: str, getter: str) -> ProcessSetting:
    return ProcessSetting(setter, _at(getter), _at(setter))


def _attribute(path: str) -> ProcessSetting:
    owner, _, name = path.rpartition(".")
    return ProcessSetting(path, functools.partial(getattr, _at(owner), name), functools.partial(setattr, _at(owner), name))


def _list(path: str, changed: Callable[[], None] = lambda: None) -> ProcessSetting:
    """A module-level list that code appends to or replaces (``sys.path``): the same object gets its
    entries back. The value carries the list's id, so a replaced list with equal entries differs."""
    owner, _, name = path.rpartition(".")
    module = _at(owner)

    def get() -> tuple[int, list, list]:
        current = getattr(module, name)
        return id(current), current, list(current)

    def restore(saved: tuple[int, list, list]) -> None:
        _, original, entries = saved
        original[:] = entries
        setattr(module, name, original)
        changed()

    return ProcessSetting(path, get, restore)


def _default_device_mode() -> Any:
    """The mode ``torch.set_default_device`` keeps on the function-mode stack (None: none), by identity."""
    return getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None)


def _restore_default_device(mode: Any) -> None:
    torch.set_default_device(None if mode is None else mode.device)


def _deterministic() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def _restore_deterministic(saved: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def _anomaly() -> tuple[bool, bool]:
    return torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()


def _restore_anomaly(saved: tuple[bool, bool]) -> None:
    torch.set_anomaly_enabled(*saved)


def _environ() -> dict[Any, Any]:
    """``os.environ``'s encoded entries: copying them costs a hundredth of ``dict(os.environ)``, which
    decodes every one, and this runs on every forward."""
    return os.environ._data.copy()  # type: ignore[attr-defined]


def _restore_environ(saved: dict[Any, Any]) -> None:
    current, environ = os.environ._data, os.environ  # type: ignore[attr-defined]
    for key in current.keys() - saved.keys():
        del environ[environ.decodekey(key)]  # type: ignore[attr-defined]
    for key, value in saved.items():
        if current.get(key) != value:
            environ[environ.decodekey(key)] = environ.decodevalue(value)  # type: ignore[attr-defined]


def _fp32_precision(node: str) -> str:
    return f"torch.backends.{node}.fp32_precision" if node else "torch.backends.fp32_precision"


# Restored in this order. The legacy precision switches (matmul precision, ``allow_tf32``) come before
# the ``fp32_precision`` tree they are computed from (torch >= 2.9), which is put back exactly, a parent
# before its children (setting a parent also sets them). ``set_num_interop_threads`` is absent: it
# works once per process, so nobody can undo a forward's call.
_ROWS: tuple[tuple[Callable[..., ProcessSetting], tuple[Any, ...]], ...] = (
    (_calls, ("torch.set_grad_enabled", "torch.is_grad_enabled")),
    (_calls, ("torch.set_default_dtype", "torch.get_default_dtype")),
    (ProcessSetting, ("torch.set_default_device", _default_device_mode, _restore_default_device)),
    (ProcessSetting, ("torch.set_autocast_enabled", _autocast_state, _restore_autocast)),
    (_calls, ("torch.set_autocast_cache_enabled", "torch.is_autocast_cache_enabled")),
    (_calls, ("torch.set_float32_matmul_precision", "torch.get_float32_matmul_precision")),
    (_attribute, ("torch.backends.cuda.matmul.allow_tf32",)),
    (_attribute, ("torch.backends.cudnn.allow_tf32",)),
    *((_attribute, (_fp32_precision(node),)) for node in (
        "", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")),
    *((_calls, (f"torch.backends.cuda.enable_{kernel}_sdp", f"torch.backends.cuda.{kernel}_sdp_enabled"))
      for kernel in ("flash", "mem_efficient", "math", "cudnn")),
    (ProcessSetting, ("torch.use_deterministic_algorithms", _deterministic, _restore_deterministic)),
    (_calls, ("torch.set_num_threads", "torch.get_num_threads")),
    (ProcessSetting, ("torch.autograd.set_detect_anomaly", _anomaly, _restore_anomaly)),
    *((_attribute, (f"torch.backends.cudnn.{flag}",)) for flag in ("benchmark", "deterministic", "enabled")),
    (_list, ("warnings.filters", getattr(warnings, "_filters_mutated", lambda: None))),  # drops "once" caches
    (_attribute, ("warnings.showwarning",)),
    (ProcessSetting, ("os.environ", _environ, _restore_environ)),
    (_list, ("sys.path",)),
)


def _supported(rows: tuple[tuple[Callable[..., ProcessSetting], tuple[Any, ...]], ...]) -> tuple[ProcessSetting, ...]:
    """The rows this torch has (older ones lack some getters)."""
    settings = []
    for build, arguments in rows:
        try:
            setting = build(*arguments)
            with contextlib.suppress(RuntimeError):  # there, but unreadable now (legacy and new precision APIs mixed)
                setting.get()
        except AttributeError:
            continue
        settings.append(setting)
    return tuple(settings)


PROCESS_SETTINGS: tuple[ProcessSetting, ...] = _supported(_ROWS)


@dataclass
class GlobalModes:
    """The value of every process setting (``PROCESS_SETTINGS``) a forward may change."""

    values: list[tuple[ProcessSetting, Any]]

    @classmethod
    def capture(cls) -> GlobalModes:
        values = []
        for setting in PROCESS_SETTINGS:
            try:
                values.append((setting, setting.get()))
            except RuntimeError:  # unreadable now (mixed precision APIs): the exact fp32_precision rows hold it
                continue
        return cls(values)

    def restore(self) -> None:
        for setting, value in self.values:
            try:
                changed = setting.get() != value
            except RuntimeError:
                changed = True
            if changed:
                setting.set(value)


@dataclass
class RandomState:
    """The global generators: torch's CPU one, CUDA's once initialised, Python's, and numpy's if loaded."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    python: Any
    numpy: Any

    @classmethod
    def capture(cls) -> RandomState:
        numpy = sys.modules.get("numpy")  # never imported just for this
        return cls(
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            random.getstate(),
            numpy.random.get_state() if numpy is not None else None,
        )

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy"].random.set_state(self.numpy)


def has_values(tensor: torch.Tensor) -> bool:
    """False for tensors without storage: on the meta device, or fake."""
    return tensor.device.type != "meta" and not isinstance(tensor, FakeTensor)


def _restore_values(tensor: torch.Tensor, saved: torch.Tensor) -> None:
    """Put ``saved``'s values back into the same tensor object (untouched tensors are left alone, so
    their version counters, which autograd checks, do not move)."""
    if tensor.shape == saved.shape and tensor.dtype == saved.dtype and tensor.device == saved.device:
        if not torch.equal(tensor, saved):
            tensor.copy_(saved)
    else:  # resized in place: take the saved tensor's storage and shape
        tensor.set_(saved)


@dataclass
class ModuleState:
    """One module's own state: its tensor dicts, attributes, flag, copies of its buffers' values, and its
    parameters' ``requires_grad`` and ``.grad``."""

    module: torch.nn.Module
    training: bool
    attributes: dict[str, Any]
    parameters: dict[str, torch.nn.Parameter | None]
    tensor_data: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, int]]
    library_state: list[tuple[Any, dict[str, Any]]]
    autograd: dict[str, tuple[bool, torch.Tensor | None]]
    buffers: dict[str, torch.Tensor | None]
    buffer_values: dict[str, torch.Tensor]
    non_persistent: set[str]
    modules: dict[str, torch.nn.Module | None]

    @classmethod
    def capture(cls, module: torch.nn.Module) -> ModuleState:
        buffers = dict(module._buffers)
        parameters = {name: p for name, p in module._parameters.items() if p is not None}
        return cls(
            module=module,
            training=module.training,
            attributes=dict(vars(module)),
            parameters=dict(module._parameters),
            tensor_data=_tensor_data(parameters),
            library_state=_library_state(parameters.values()),
            autograd={name: (p.requires_grad, p.grad) for name, p in parameters.items()},
            buffers=buffers,
            buffer_values={
                name: b.detach().clone() for name, b in buffers.items() if b is not None and has_values(b)
            },
            non_persistent=set(module._non_persistent_buffers_set),
            modules=dict(module._modules),
        )

    def restore(self) -> list[tuple[str, str]]:
        """Restore (under ``no_grad``); return the (parameter, "" or ".grad") the forward wrote in place."""
        module = self.module
        if module.training != self.training:  # Module.__setattr__ is slow: only when changed
            module.training = self.training
        self._restore_tensor_attributes()
        _replace_contents(module._parameters, self.parameters)
        _replace_contents(module._buffers, self.buffers)
        _replace_contents(module._modules, self.modules)
        _replace_contents(module._non_persistent_buffers_set, self.non_persistent)
        for name, saved in self.buffer_values.items():
            _restore_values(self.buffers[name], saved)  # type: ignore[arg-type]
        written = self._restore_tensor_data()
        for owner, attributes in self.library_state:
            _replace_contents(vars(owner), attributes)
        for name, (requires_grad, grad) in self.autograd.items():
            parameter = self.parameters[name]
            if parameter.requires_grad != requires_grad:  # type: ignore[union-attr]
                parameter.requires_grad_(requires_grad)  # type: ignore[union-attr]
            if parameter.grad is not grad:  # type: ignore[union-attr]
                parameter.grad = grad  # type: ignore[union-attr]
        return written

    def _restore_tensor_attributes(self) -> None:
        """Entries of ``vars(module)`` that hold a tensor now or did before (plain tensor attributes), and
        every entry of a quantization library's module."""
        current, saved = vars(self.module), self.attributes
        every_attribute = _library_managed(self.module)  # its first forward sets flags (compute_type_is_set)
        changed = [name for name, value in current.items() if saved.get(name, _MISSING) is not value]
        for name in [*changed, *(saved.keys() - current.keys())]:
            before, now = saved.get(name, _MISSING), current.get(name, _MISSING)
            if not every_attribute and not isinstance(before, torch.Tensor) and not isinstance(now, torch.Tensor):
                continue  # tensor attributes are restored; other state is the model's own business
            if before is _MISSING:
                del current[name]
            else:
                current[name] = before

    def _restore_tensor_data(self) -> list[tuple[str, str]]:
        written = []
        for key, (tensor, data, version) in self.tensor_data.items():
            if not _same_data(tensor, data):
                tensor.data = data  # ``.data`` reassigned (``.half()`` inside forward): undoable
            elif tensor._version != version:
                written.append(key)
        return written


def _tensor_data(parameters: dict[str, torch.nn.Parameter]) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, int]]:
    """Each parameter's and gradient's tensor, ``.data`` and version counter, keyed by (parameter, "" or
    ".grad"): a reassigned ``.data`` is put back, a moved counter reveals an in-place write."""
    data = {}
    for name, parameter in parameters.items():
        data[name, ""] = (parameter, parameter.data, parameter._version)
        grad = parameter.grad
        if grad is not None:
            data[name, ".grad"] = (grad, grad.data, grad._version)
    return data


# Quantization libraries whose parameters own their storage: bitsandbytes' CPU backend repacks a 4-bit
# weight's ``.data`` and its ``quant_state`` together on a forward (and unpacks them for state_dict()).
# Both are put back together: ``.data`` alone would pair with the new quant_state and corrupt the layer.
LIBRARY_MANAGED = ("bitsandbytes",)


def _library_managed(value: Any) -> bool:
    return type(value).__module__.split(".")[0] in LIBRARY_MANAGED


def _library_state(parameters: Iterable[torch.nn.Parameter]) -> list[tuple[Any, dict[str, Any]]]:
    """Each library-managed parameter, and each library object it reaches by attributes (bitsandbytes'
    ``quant_state`` and the nested ``state2``), with a shallow copy of its attributes."""
    pending = [parameter for parameter in parameters if _library_managed(parameter)]
    state, seen = [], set()
    while pending:
        owner = pending.pop()
        if id(owner) in seen:
            continue
        seen.add(id(owner))
        attributes = dict(vars(owner))
        state.append((owner, attributes))
        pending.extend(value for value in attributes.values()
                       if _library_managed(value) and not isinstance(value, torch.nn.Module))
    return state


def _same_data(parameter: torch.Tensor, data: torch.Tensor) -> bool:
    if parameter.shape != data.shape or parameter.dtype != data.dtype or parameter.device != data.device:
        return False
    return not has_values(parameter) or parameter.data_ptr() == data.data_ptr()


def _replace_contents(target: Any, saved: Any) -> None:
    """Make a dict or set hold ``saved``'s entries again, keeping the container object itself (values
    compare by identity: ``==`` on tensors is elementwise). A script module's ``_parameters``, ``_buffers``
    and ``_modules`` are views of its C++ attributes: their keys are fixed, each value is put back."""
    if isinstance(target, set):
        if target != saved:
            target.clear()
            target.update(saved)
    elif isinstance(target, dict):
        if target.keys() != saved.keys() or any(target[key] is not value for key, value in saved.items()):
            target.clear()
            target.update(saved)
    else:
        for key, value in saved.items():
            if target[key] is not value:
                target[key] = value


def refuse_uninitialised_lazy(model: torch.nn.Module) -> None:
    """Raise UsageError for a lazy module (``nn.LazyLinear``) not yet run: its first forward creates its
    parameters and turns it into its plain class, which cannot be undone."""
    for name, module in model.named_modules():
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            where = f"module {name!r}" if name else "the model"
            raise UsageError(
                f"{where} ({type(module).__name__}) is a lazy module that has not run yet: its first forward would "
                "create its parameters, which dtypelint cannot undo; run the model once on a sample batch first"
            )


def fresh_copies(value: Any) -> Any:
    """``value`` with every tensor that holds data (in tuples, lists and dicts, however nested) replaced
    by a copy: a forward that writes its inputs in place leaves the caller's alone, and each forward
    dtypelint runs starts from the same values. Fake and meta tensors, having none, are kept. A tensor
    passed twice is copied once: code that checks identity (``nn.MultiheadAttention``'s fast path wants
    ``query is key is value``) takes the path it takes on the caller's tensors."""
    copies: dict[int, torch.Tensor] = {}  # by id: the tensors stay alive in ``value`` meanwhile

    def copy_once(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in copies:
            copies[id(tensor)] = _fresh_copy(tensor)
        return copies[id(tensor)]

    return tree_map_only(torch.Tensor, copy_once, value)


def _fresh_copy(tensor: torch.Tensor) -> torch.Tensor:
    if not has_values(tensor):
        return tensor
    copy = tensor.detach().clone()
    return copy.requires_grad_() if tensor.requires_grad else copy


@dataclass
class Preserved:
    """What ``preserved`` could not undo: parameters (and gradients, ``NAME.grad``) the forward wrote in
    place, by name."""

    written_parameters: list[str] = field(default_factory=list)


def parameter_names(model: torch.nn.Module) -> dict[tuple[int, str], str]:
    """Qualified parameter names keyed by (module id, local name)."""
    return {
        (id(module), local): f"{prefix}.{local}" if prefix else local
        for prefix, module in model.named_modules(remove_duplicate=False)
        for local in module._parameters
    }


# True inside ``preserved``: the process settings are captured there already (the tracer then skips it).
_SETTINGS_GUARDED: ContextVar[bool] = ContextVar("dtypelint_settings_guarded", default=False)


def settings_guarded() -> bool:
    """Whether the code running now is inside ``preserved``, which restores every process setting."""
    return _SETTINGS_GUARDED.get()


@contextmanager
def preserved(model: torch.nn.Module) -> Iterator[Preserved]:
    """Run the body, then restore the model's buffers (values, dtypes, persistence, identity), tensor
    attributes, parameter and submodule identity, parameters' ``requires_grad`` and ``.grad``,
    ``training`` flags, the process settings (``PROCESS_SETTINGS``) and the global random generators.
    In-place writes to parameters and gradients are detected, not undone."""
    modes, randomness = GlobalModes.capture(), RandomState.capture()
    states = [ModuleState.capture(module) for module in model.modules()]
    outcome = Preserved()
    guard = _SETTINGS_GUARDED.set(True)
    try:
        yield outcome
    finally:
        _SETTINGS_GUARDED.reset(guard)
        modes.restore()  # first: the default device and dtype are the caller's again for what follows
        with torch.no_grad():
            written = {(id(state.module), *key) for state in states for key in state.restore()}
        randomness.restore()
        if written:
            names = parameter_names(model)
            outcome.written_parameters = sorted(
                names[module, name] + suffix for module, name, suffix in written if (module, name) in names
            )
