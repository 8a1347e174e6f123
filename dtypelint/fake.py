"""Meta mode's stand-ins: fake CPU tensors (shape and dtype, no storage) for a model's parameters, buffers
and tensor attributes and for its inputs, swapped in for one call only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_map_only


def new_fake_mode() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake(tensor: torch.Tensor, fake_mode: FakeTensorMode) -> torch.Tensor:
    """A fake CPU stand-in for a real or meta tensor (itself when it is already one of this mode)."""
    if isinstance(tensor, FakeTensor) and tensor.fake_mode is fake_mode:
        return tensor
    if tensor.device.type == "meta":
        return fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, tensor, torch.device("cpu"))
    return fake_mode.from_tensor(tensor)


def fake_call(
    model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], fake_mode: FakeTensorMode
) -> tuple[dict[str, torch.Tensor], tuple, dict[str, Any]]:
    """Fake stand-ins of the model's parameters and buffers (for ``functional_call``) and of the inputs,
    however deeply they are nested."""
    state = {name: fake(t, fake_mode) for name, t in [*model.named_parameters(), *model.named_buffers()]}

    def swap(value: torch.Tensor) -> torch.Tensor:
        return fake(value, fake_mode)

    return state, tree_map_only(torch.Tensor, swap, args), tree_map_only(torch.Tensor, swap, kwargs)


@contextmanager
def fake_attributes(model: torch.nn.Module, fake_mode: FakeTensorMode) -> Iterator[None]:
    """Plain tensor attributes (GPT-J's ``embed_positions``) as fake stand-ins for the call only:
    ``functional_call`` swaps parameters and buffers, not these."""
    swapped = [
        (module, name, value)
        for module in model.modules()
        for name, value in vars(module).items()
        if isinstance(value, torch.Tensor)
    ]
    for module, name, value in swapped:
        module.__dict__[name] = fake(value, fake_mode)
    try:
        yield
    finally:
        for module, name, value in swapped:
            module.__dict__[name] = value
