"""Attack table: forwards that mutate state. ``audit`` (value and meta mode) and ``fix`` (its reference,
per-group and re-audit forwards) must leave the model and the process exactly as they found them."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import snapshot
from torch import nn

import dtypelint

INPUT = torch.linspace(-1, 1, 8).reshape(2, 4)


class Boom(Exception):
    pass


class BatchNormTrain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class EmaCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ema", torch.zeros(4))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ema.mul_(0.9).add_(x.mean(0), alpha=0.1)
        self.steps += 1
        return x + self.ema


class SpectralNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.utils.spectral_norm(nn.Linear(4, 4))  # u, v: buffers; weight: a plain attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class WithBuffer(nn.Module):
    """A buffer ``b``, a parameter ``w`` and a forward given as a function of (module, x)."""

    def __init__(self, forward: Callable[[nn.Module, torch.Tensor], Any]) -> None:
        super().__init__()
        self.register_buffer("b", torch.arange(4.0))
        self.w = nn.Parameter(torch.ones(4))
        self.table = torch.full((4,), 2.0)  # plain tensor attributes
        self.gone = torch.zeros(4)
        self.slot: torch.Tensor | None = None
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._forward(self, x)
        return x * self.w + self.b if out is None else out


def replace_buffer_and_raise(m: nn.Module, x: torch.Tensor) -> None:
    m.b = torch.ones(4, dtype=torch.float16)
    raise Boom


def delete_and_add_buffers(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    del m.b
    m.register_buffer("new", x.detach().clone())
    return x * m.w


def make_buffer_non_persistent(m: nn.Module, x: torch.Tensor) -> None:
    m.register_buffer("b", m.b, persistent=False)


def resize_buffer_in_place(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m.b.resize_(8).fill_(3.0)
    return x * m.w


def train_false_and_raise(m: nn.Module, x: torch.Tensor) -> None:
    m.train(False)
    raise Boom


def rewrite_tensor_attributes(m: nn.Module, x: torch.Tensor) -> None:
    m.cache = x.detach()
    m.table = m.table * 2
    m.table.add_(1)
    del m.gone
    m.slot = x.detach()


def replace_parameter(m: nn.Module, x: torch.Tensor) -> None:
    m.w = nn.Parameter(m.w.detach() * 2)


def cast_itself_to_half(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m.half()
    return x.half() * m.w + m.b


def enable_autocast_and_raise(m: nn.Module, x: torch.Tensor) -> None:
    for device in ("cpu", "cuda"):
        torch.set_autocast_enabled(device, True)
        torch.set_autocast_dtype(device, torch.float16 if device == "cpu" else torch.bfloat16)
    torch.set_autocast_cache_enabled(False)
    raise Boom


def flip_grad_and_default_dtype(m: nn.Module, x: torch.Tensor) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(True)


def draw_random_numbers(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    random.random()
    np.random.rand()
    return F.dropout(x * m.w, 0.5, training=True) + torch.rand(4)


MUTATORS: dict[str, Callable[[], nn.Module]] = {
    "batchnorm in train() updates running stats": BatchNormTrain,
    "EMA and step-counter buffers": EmaCounter,
    "spectral_norm power iteration (u, v, weight attribute)": SpectralNorm,
    "replaces a buffer, then raises": lambda: WithBuffer(replace_buffer_and_raise),
    "deletes a buffer, registers a new one": lambda: WithBuffer(delete_and_add_buffers),
    "re-registers a buffer as non-persistent": lambda: WithBuffer(make_buffer_non_persistent),
    "resizes a buffer in place": lambda: WithBuffer(resize_buffer_in_place),
    "train(False), then raises": lambda: WithBuffer(train_false_and_raise),
    "adds, replaces, writes and deletes tensor attributes": lambda: WithBuffer(rewrite_tensor_attributes),
    "replaces a Parameter object": lambda: WithBuffer(replace_parameter),
    "casts itself with .half()": lambda: WithBuffer(cast_itself_to_half),
    "enables autocast (cpu, cuda), then raises": lambda: WithBuffer(enable_autocast_and_raise),
    "flips grad mode and the default dtype": lambda: WithBuffer(flip_grad_and_default_dtype),
    "draws from torch, random and numpy generators": lambda: WithBuffer(draw_random_numbers),
}


class Harness(nn.Module):
    """A float32 model (audited with ``dtype=float32``) with a stray float16 ``scale`` (an unsafe DT105
    fix, so ``fix`` runs its forwards) in front of the mutator."""

    def __init__(self, mutator: nn.Module) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.float16))
        self.mutator = mutator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mutator(x * self.scale)


def _autocast() -> list[tuple[bool, torch.dtype]]:
    return [(torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]


def everything(model: nn.Module) -> dict[str, Any]:
    """conftest's snapshot plus identities, tensor attributes and process state."""
    modules = dict(model.named_modules())
    return {
        **snapshot(model),
        "identity": {
            (path, kind, name): id(value)
            for path, module in modules.items()
            for kind in ("_parameters", "_buffers")
            for name, value in getattr(module, kind).items()
        },
        "parameter_data": {name: (p.data_ptr(), p.dtype) for name, p in model.named_parameters()},
        "attributes": {
            (path, name): (id(value), value.clone())
            for path, module in modules.items()
            for name, value in vars(module).items()
            if isinstance(value, torch.Tensor)
        },
        "globals": (torch.is_grad_enabled(), torch.get_default_dtype(), _autocast(), torch.is_autocast_cache_enabled()),
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any], *, changed: set[str] = frozenset()) -> None:
    """Equal in every respect, except the dtype and values of the tensors in ``changed`` (a fix's casts)."""
    for key in ("buffers", "persistent", "hooks", "training", "identity", "globals"):
        assert after[key] == before[key], key
    for key in ("params", "parameter_data"):
        assert {k: v for k, v in after[key].items() if k not in changed} == {
            k: v for k, v in before[key].items() if k not in changed
        }, key
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        if name not in changed:
            assert torch.equal(after["state"][name], tensor), name
    assert after["attributes"].keys() == before["attributes"].keys()
    for key, (identity, value) in before["attributes"].items():
        assert after["attributes"][key][0] == identity and torch.equal(after["attributes"][key][1], value), key
    assert torch.equal(after["rng"][0], before["rng"][0]), "torch RNG"
    assert after["rng"][1] == before["rng"][1], "random"
    assert np.array_equal(after["rng"][2], before["rng"][2]), "numpy RNG"


def _fix(model: nn.Module) -> set[str]:
    result = dtypelint.fix(model, inputs=INPUT, unsafe=True, dtype=torch.float32)
    assert [change.tensor for change in result.plan.changes] == ["scale"], "fix must run its forwards"
    return {change.tensor for change in result.changed}


RUNNERS: dict[str, Callable[[nn.Module], set[str]]] = {
    "audit value": lambda model: dtypelint.audit(model, INPUT) and set(),
    "audit meta": lambda model: dtypelint.audit(model, INPUT, mode="meta") and set(),
    "fix (unsafe)": _fix,
}


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("mutator", list(MUTATORS))
def test_dtypelint_leaves_no_trace_of_a_mutating_forward(mutator: str, runner: str) -> None:
    torch.manual_seed(0)
    model = Harness(MUTATORS[mutator]()).train()
    before = everything(model)
    changed = RUNNERS[runner](model)
    assert_same(before, everything(model), changed=changed)


def test_the_mutators_do_mutate_without_dtypelint() -> None:
    """Guards the table: each row's forward really changes something a snapshot sees."""
    for name, make in MUTATORS.items():
        torch.manual_seed(0)
        model = Harness(make()).train()
        before = everything(model)
        grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
        try:
            model(INPUT)
        except Boom:
            pass
        finally:
            after = everything(model)
            torch.set_grad_enabled(grad)
            torch.set_default_dtype(dtype)
            for device in ("cpu", "cuda"):
                torch.set_autocast_enabled(device, False)
            torch.set_autocast_dtype("cpu", torch.bfloat16)
            torch.set_autocast_dtype("cuda", torch.float16)
            torch.set_autocast_cache_enabled(True)
        with pytest.raises(AssertionError):
            assert_same(before, after)
        print(name, "mutates")


def _data_add(m: nn.Module, x: torch.Tensor) -> None:
    m.w.data.add_(1)


def _no_grad_mul(m: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        m.w.mul_(2)


def _view_zero(m: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        m.w[:2].zero_()


def _out_argument(m: nn.Module, x: torch.Tensor) -> None:
    torch.add(m.w.data, 1, out=m.w.data)


@pytest.mark.parametrize(
    "forward", [_data_add, _no_grad_mul, _view_zero, _out_argument], ids=lambda f: f.__name__.strip("_")
)
def test_an_in_place_parameter_write_is_reported_since_it_cannot_be_undone(forward) -> None:
    model = Harness(WithBuffer(forward))
    report = dtypelint.audit(model, INPUT)
    notes = [note for note in report.notes if "wrote parameter" in note]
    assert notes == ["the forward wrote parameter mutator.w in place; dtypelint cannot undo it"]
    assert "mutator.w" in report.render()


def test_a_clean_forward_gets_no_parameter_note(tiny_llama_fp16, input_ids) -> None:
    report = dtypelint.audit(tiny_llama_fp16, {"input_ids": input_ids})
    assert not [note for note in report.notes if "wrote parameter" in note]


@pytest.mark.parametrize("mode", ["value", "meta"])
def test_tiny_llama_in_train_mode_with_dropout(tiny_llama_fp16, input_ids, mode) -> None:
    model = tiny_llama_fp16.train()
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    before = everything(model)
    dtypelint.audit(model, {"input_ids": input_ids}, mode=mode)
    assert_same(before, everything(model))


def test_an_audit_inside_a_test_keeps_the_users_random_stream(stray_fp32_layer) -> None:
    def stream(audit: bool) -> torch.Tensor:
        torch.manual_seed(123)
        first = torch.rand(3)
        if audit:
            dtypelint.audit(Harness(WithBuffer(draw_random_numbers)).train(), INPUT)
        return torch.cat([first, torch.rand(3)])

    assert torch.equal(stream(audit=False), stream(audit=True))


WRAPPERS = {"DataParallel": nn.DataParallel}


@pytest.mark.parametrize("mode", ["value", "meta"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_data_parallel_is_audited_through_its_module(wrapper, mode) -> None:
    model = Harness(EmaCounter())
    plain = dtypelint.audit(model, INPUT, mode=mode, dtype=torch.float32)
    wrapped = dtypelint.audit(WRAPPERS[wrapper](model), INPUT, mode=mode, dtype=torch.float32)
    assert [(f.code, f.location, f.tensor) for f in wrapped.findings] == [("DT105", "", "scale")]
    assert [(f.code, f.location, f.tensor) for f in plain.findings] == [("DT105", "", "scale")]
    assert any(".module" in note for note in wrapped.notes)
