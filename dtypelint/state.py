"""Leave nothing behind: snapshot what a forward may change, and put it back afterwards.

A forward can update buffers (BatchNorm's running statistics in ``train()``, EMA and step counters,
``spectral_norm``'s ``u``/``v``), replace or delete buffers and tensor attributes, flip ``training``
flags, switch autocast or the default dtype on, and draw from the global random generators. Every
forward dtypelint runs goes through ``preserved(model)``, which restores all of that, also when the
forward raises. Parameters are not copied (they are the bulk of the memory): their ``_version``
counters and storages reveal an in-place write, which is reported since it cannot be undone.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor

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


@dataclass
class GlobalModes:
    """Grad mode, default dtype and autocast: process-wide switches a forward may flip."""

    grad_enabled: bool
    default_dtype: torch.dtype
    autocast: dict[str, tuple[bool, torch.dtype]]
    autocast_cache: bool

    @classmethod
    def capture(cls) -> GlobalModes:
        return cls(torch.is_grad_enabled(), torch.get_default_dtype(), _autocast_state(),
                   torch.is_autocast_cache_enabled())

    def restore(self) -> None:
        torch.set_grad_enabled(self.grad_enabled)
        torch.set_default_dtype(self.default_dtype)
        if _autocast_state() != self.autocast:
            for device, (enabled, dtype) in self.autocast.items():
                _set_autocast(device, enabled, dtype)
        torch.set_autocast_cache_enabled(self.autocast_cache)


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
    """One module's own state: its tensor dicts, attributes, flag, and copies of its buffers' values."""

    module: torch.nn.Module
    training: bool
    attributes: dict[str, Any]
    parameters: dict[str, torch.nn.Parameter | None]
    parameter_data: dict[str, tuple[torch.Tensor, int]]
    buffers: dict[str, torch.Tensor | None]
    buffer_values: dict[str, torch.Tensor]
    non_persistent: set[str]
    modules: dict[str, torch.nn.Module | None]

    @classmethod
    def capture(cls, module: torch.nn.Module) -> ModuleState:
        buffers = dict(module._buffers)
        parameters = dict(module._parameters)
        return cls(
            module=module,
            training=module.training,
            attributes=dict(vars(module)),
            parameters=parameters,
            parameter_data={
                name: (p.data, p._version) for name, p in parameters.items() if p is not None and not _library_managed(p)
            },
            buffers=buffers,
            buffer_values={
                name: b.detach().clone() for name, b in buffers.items() if b is not None and has_values(b)
            },
            non_persistent=set(module._non_persistent_buffers_set),
            modules=dict(module._modules),
        )

    def restore(self) -> list[str]:
        """Restore (under ``no_grad``); return the names of parameters the forward wrote in place."""
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
        return self._restore_parameter_data()

    def _restore_tensor_attributes(self) -> None:
        """Entries of ``vars(module)`` that hold a tensor now or did before (plain tensor attributes)."""
        current, saved = vars(self.module), self.attributes
        changed = [name for name, value in current.items() if saved.get(name, _MISSING) is not value]
        for name in [*changed, *(saved.keys() - current.keys())]:
            before, now = saved.get(name, _MISSING), current.get(name, _MISSING)
            if not isinstance(before, torch.Tensor) and not isinstance(now, torch.Tensor):
                continue  # only tensor attributes are restored
            if before is _MISSING:
                del current[name]
            else:
                current[name] = before

    def _restore_parameter_data(self) -> list[str]:
        written = []
        for name, (data, version) in self.parameter_data.items():
            parameter = self.parameters[name]
            if not _same_data(parameter, data):
                parameter.data = data  # ``.data`` reassigned (``.half()`` inside forward): undoable
            elif parameter._version != version:
                written.append(name)
        return written


# Quantization libraries whose parameters own their storage: bitsandbytes' CPU backend repacks a 4-bit
# weight's ``.data`` and its ``quant_state`` together on every forward (and unpacks them for state_dict()).
# Putting back only ``.data`` would pair it with the new quant_state and corrupt the layer.
LIBRARY_MANAGED = ("bitsandbytes",)


def _library_managed(parameter: torch.Tensor) -> bool:
    return type(parameter).__module__.split(".")[0] in LIBRARY_MANAGED


def _same_data(parameter: torch.Tensor, data: torch.Tensor) -> bool:
    if parameter.shape != data.shape or parameter.dtype != data.dtype or parameter.device != data.device:
        return False
    return not has_values(parameter) or parameter.data_ptr() == data.data_ptr()


def _replace_contents(target: Any, saved: Any) -> None:
    """Make a dict or set hold ``saved``'s entries again, keeping the container object itself (values
    compare by identity: ``==`` on tensors is elementwise)."""
    if isinstance(saved, dict):
        unchanged = target.keys() == saved.keys() and all(target[key] is value for key, value in saved.items())
    else:
        unchanged = target == saved
    if not unchanged:
        target.clear()
        target.update(saved)


@dataclass
class Preserved:
    """What ``preserved`` could not undo: parameters the forward wrote in place, by name."""

    written_parameters: list[str] = field(default_factory=list)


def parameter_names(model: torch.nn.Module) -> dict[tuple[int, str], str]:
    """Qualified parameter names keyed by (module id, local name)."""
    return {
        (id(module), local): f"{prefix}.{local}" if prefix else local
        for prefix, module in model.named_modules(remove_duplicate=False)
        for local in module._parameters
    }


@contextmanager
def preserved(model: torch.nn.Module) -> Iterator[Preserved]:
    """Run the body, then restore the model's buffers (values, dtypes, persistence, identity), tensor
    attributes, parameter and submodule identity, ``training`` flags, grad mode, default dtype, autocast
    and the global random generators. In-place writes to parameters are detected, not undone."""
    modes, randomness = GlobalModes.capture(), RandomState.capture()
    states = [ModuleState.capture(module) for module in model.modules()]
    outcome = Preserved()
    try:
        yield outcome
    finally:
        with torch.no_grad():
            written = {(id(state.module), name) for state in states for name in state.restore()}
        modes.restore()
        randomness.restore()
        if written:
            names = parameter_names(model)
            outcome.written_parameters = sorted(names[key] for key in written if key in names)
