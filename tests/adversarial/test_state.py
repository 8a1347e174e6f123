"""Attack table: forwards that mutate state. ``audit`` (value and meta mode) and ``fix`` (its reference,
per-group and re-audit forwards) must leave the model and the process exactly as they found them."""

from __future__ import annotations

import os
import random
import sys
import textwrap
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import snapshot
from torch import nn
from torch.nn.parameter import UninitializedParameter

import dtypelint
from dtypelint import UsageError
from dtypelint.state import PROCESS_SETTINGS

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


def train_a_step(m: nn.Module, x: torch.Tensor) -> None:
    with torch.enable_grad():
        (x.detach() * m.w).sum().backward()  # fills m.w.grad
    m.w.requires_grad_(False)


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
    "runs a backward of its own (.grad), then requires_grad_(False)": lambda: WithBuffer(train_a_step),
    "a torch.jit.script submodule: BatchNorm1d in train()": lambda: torch.jit.script(nn.BatchNorm1d(4)),
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


def _read(setting: Any) -> Any:
    try:
        return setting.get()
    except RuntimeError as error:  # the legacy precision getters refuse a state that mixes in the new API
        return f"unreadable: {error}"


def process_state() -> dict[str, Any]:
    """Every process setting dtypelint restores (its own table), and what shows the default device and the
    environment from outside it."""
    return {
        **{setting.name: _read(setting) for setting in PROCESS_SETTINGS},
        "default device": torch.get_default_device(),
        "function modes": torch._C._len_torch_function_stack(),
        "environment": dict(os.environ),
    }


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
        "grads": {name: None if p.grad is None else (id(p.grad), p.grad.clone()) for name, p in model.named_parameters()},
        "attributes": {
            (path, name): (id(value), value.clone())
            for path, module in modules.items()
            for name, value in vars(module).items()
            if isinstance(value, torch.Tensor)
        },
        "globals": (torch.is_grad_enabled(), torch.get_default_dtype(), _autocast(), torch.is_autocast_cache_enabled()),
        "process": process_state(),
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any], *, changed: set[str] = frozenset()) -> None:
    """Equal in every respect, except the dtype and values of the tensors in ``changed`` (a fix's casts)."""
    for key in ("buffers", "persistent", "hooks", "training", "identity", "globals", "process"):
        assert after[key] == before[key], key
    assert after["grads"].keys() == before["grads"].keys()
    for name, grad in before["grads"].items():
        now = after["grads"][name]
        assert (now is None) == (grad is None) and (grad is None or now[0] == grad[0] and torch.equal(now[1], grad[1])), name
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


# The process settings the issue lists: the table must hold each (torch >= 2.9 adds the fp32_precision tree).
LISTED_SETTINGS = {
    "torch.set_default_device", "torch.set_float32_matmul_precision", "torch.backends.cuda.matmul.allow_tf32",
    "torch.backends.cudnn.allow_tf32", "torch.backends.cuda.enable_flash_sdp",
    "torch.backends.cuda.enable_mem_efficient_sdp", "torch.backends.cuda.enable_math_sdp",
    "torch.backends.cuda.enable_cudnn_sdp", "torch.use_deterministic_algorithms", "torch.set_num_threads",
    "torch.autograd.set_detect_anomaly", "torch.backends.cudnn.benchmark", "torch.backends.cudnn.deterministic",
    "torch.backends.cudnn.enabled", "warnings.filters", "warnings.showwarning", "os.environ", "sys.path",
    "torch.set_grad_enabled", "torch.set_default_dtype", "torch.set_autocast_enabled",
    "torch.set_autocast_cache_enabled",
}
FP32_PRECISION_NODES = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
                        "mkldnn.rnn")


def _other_fp32_precision(node: str) -> Callable[[str], None]:
    def change(entry: str) -> None:
        owner = torch.backends
        for name in filter(None, node.split(".")):
            owner = getattr(owner, name)
        owner.fp32_precision = "ieee" if entry == "tf32" else "tf32"

    return change


def _rewrite_environment(entry: Any) -> None:
    os.environ["DTYPELINT_TEST_ADDED"] = "added"
    os.environ["DTYPELINT_TEST_CHANGED"] = "changed"
    del os.environ["DTYPELINT_TEST_REMOVED"]


# How a forward changes each setting away from its value when the forward began (the argument), which is the
# caller's (the tests run under no_grad: grad mode goes on).
CHANGES: dict[str, Callable[[Any], Any]] = {
    "torch.set_grad_enabled": lambda _: torch.set_grad_enabled(True),
    "torch.set_default_dtype": lambda _: torch.set_default_dtype(torch.float64),
    "torch.set_default_device": lambda _: torch.set_default_device("meta"),
    "torch.set_autocast_enabled": lambda _: torch.set_autocast_enabled("cpu", True),
    "torch.set_autocast_cache_enabled": lambda _: torch.set_autocast_cache_enabled(False),
    "torch.set_float32_matmul_precision": lambda _: torch.set_float32_matmul_precision("medium"),
    "torch.backends.cuda.matmul.allow_tf32": lambda _: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "torch.backends.cudnn.allow_tf32": lambda _: setattr(torch.backends.cudnn, "allow_tf32", False),
    **{f"torch.backends.{node}.fp32_precision".replace("..", "."): _other_fp32_precision(node)
       for node in FP32_PRECISION_NODES},
    **{f"torch.backends.cuda.enable_{kernel}_sdp": lambda _, kernel=kernel: getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(False)
       for kernel in ("flash", "mem_efficient", "math", "cudnn")},
    "torch.use_deterministic_algorithms": lambda _: torch.use_deterministic_algorithms(True, warn_only=True),
    "torch.set_num_threads": lambda _: torch.set_num_threads(torch.get_num_threads() + 1),
    "torch.autograd.set_detect_anomaly": lambda _: torch.autograd.set_detect_anomaly(True, check_nan=False),
    "torch.backends.cudnn.benchmark": lambda _: setattr(torch.backends.cudnn, "benchmark", True),
    "torch.backends.cudnn.deterministic": lambda _: setattr(torch.backends.cudnn, "deterministic", True),
    "torch.backends.cudnn.enabled": lambda _: setattr(torch.backends.cudnn, "enabled", False),
    "warnings.filters": lambda _: warnings.simplefilter("ignore"),
    "warnings.showwarning": lambda _: setattr(warnings, "showwarning", lambda *args, **kwargs: None),
    "os.environ": _rewrite_environment,
    "sys.path": lambda _: sys.path.append("/nowhere"),
}
TABLE = [setting.name for setting in PROCESS_SETTINGS]


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTYPELINT_TEST_CHANGED", "before")
    monkeypatch.setenv("DTYPELINT_TEST_REMOVED", "before")


def test_the_settings_table_holds_every_listed_setting_and_each_has_a_change() -> None:
    assert LISTED_SETTINGS <= set(TABLE), LISTED_SETTINGS - set(TABLE)
    assert set(TABLE) <= CHANGES.keys(), set(TABLE) - CHANGES.keys()
    assert len(TABLE) == len(set(TABLE))


def test_a_setting_this_torch_lacks_is_left_out_of_the_table() -> None:
    from dtypelint.state import _attribute, _calls, _supported

    rows = ((_calls, ("torch.set_num_threads", "torch.get_num_threads")),
            (_calls, ("torch.set_a_future_switch", "torch.get_a_future_switch")),
            (_attribute, ("torch.backends.cudnn.a_future_flag",)),
            (_attribute, ("torch.backends.a_future_backend.fp32_precision",)))
    assert [setting.name for setting in _supported(rows)] == ["torch.set_num_threads"]


def _changing(names: list[str], *, then_raise: bool) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A harness whose forward changes the named settings in turn (and raises, if told), and the value of
    each right after its change, per forward (a later change may undo an earlier: the fp32_precision tree)."""
    seen: list[dict[str, Any]] = []

    def forward(m: nn.Module, x: torch.Tensor) -> None:
        entry = process_state()
        seen.append({})
        for name in names:
            CHANGES[name](entry[name])
            seen[-1][name] = process_state()[name]
        if then_raise:
            raise Boom

    return Harness(WithBuffer(forward)), seen


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("setting", TABLE)
@pytest.mark.usefixtures("environment")
def test_a_process_setting_the_forward_changes_is_restored(setting: str, runner: str) -> None:
    model, seen = _changing([setting], then_raise=False)
    with torch.no_grad():
        before = process_state()
        RUNNERS[runner](model)
        after = process_state()
    assert seen and all(inside[setting] != before[setting] for inside in seen), "the forward must change it"
    assert after == before


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.usefixtures("environment")
def test_every_process_setting_is_restored_when_the_forward_raises(runner: str) -> None:
    model, seen = _changing(TABLE, then_raise=True)
    with torch.no_grad():
        before = process_state()
        RUNNERS[runner](model)
        after = process_state()
    assert seen and all(inside[name] != before[name] for inside in seen for name in TABLE)
    assert after == before


class DoublesItsInputs(nn.Module):
    """Writes its tensor inputs in place, nested ones too; a stray float16 ``scale`` gives ``fix`` an exact cast
    (float16 ones to float32) whose output change is 0 when every forward sees the same inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.float16))

    def forward(self, x: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        assert extras["label"] is LABEL  # non-tensors are passed as they are
        x.mul_(2)
        for tensor in extras["more"]:
            tensor.add_(1)
        return x * self.scale + extras["more"][0]


LABEL = object()


@pytest.mark.parametrize("runner", ["audit value", "audit meta", "fix"])
def test_each_forward_gets_fresh_copies_of_the_inputs(runner: str) -> None:
    x, y = INPUT.clone(), torch.arange(4.0)
    inputs = (x, {"more": [y], "label": LABEL})
    if runner == "fix":
        result = dtypelint.fix(DoublesItsInputs(), inputs=inputs, unsafe=True, dtype=torch.float32)
        assert [change.tensor for change in result.changed] == ["scale"]
        assert result.output_change == {"DT105": (0.0, 0.0)}  # the same inputs before and after the cast
    else:
        dtypelint.audit(DoublesItsInputs(), inputs, mode=runner.removeprefix("audit "), dtype=torch.float32)
    assert torch.equal(x, INPUT) and torch.equal(y, torch.arange(4.0))
    assert inputs[1]["more"][0] is y


@pytest.mark.parametrize("mode", ["value", "meta"])
def test_an_existing_gradient_a_forward_accumulates_into_is_reported(mode: str) -> None:
    model = Harness(WithBuffer(train_a_step))
    grad = model.mutator.w.grad = torch.zeros(4)
    report = dtypelint.audit(model, INPUT, mode=mode)
    notes = [note for note in report.notes if "wrote parameter" in note]
    assert notes == (["the forward wrote parameter mutator.w.grad in place; dtypelint cannot undo it"]
                     if mode == "value" else [])  # meta mode's backward reaches fake stand-ins only
    assert model.mutator.w.grad is grad and model.mutator.w.requires_grad


@pytest.mark.parametrize("mode", ["value", "meta"])
def test_a_lazy_module_that_has_not_run_is_refused_and_left_as_it_was(mode: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(4))
    with pytest.raises(UsageError, match=r"^module '1' \(LazyLinear\) is a lazy module that has not run yet"):
        dtypelint.audit(model, INPUT, mode=mode)
    assert type(model[1]) is nn.LazyLinear and isinstance(model[1].weight, UninitializedParameter)
    model(INPUT)  # initialised: a plain Linear now, audited as one
    assert [f.code for f in dtypelint.audit(model, INPUT, mode=mode).findings] == []


def test_the_cli_refuses_a_lazy_model_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    from dtypelint.cli import main

    (tmp_path / "lazy_model.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            return nn.LazyLinear(4), torch.ones(2, 8)
    """))
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--entry", "lazy_model:build", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtypelint: error: the model (LazyLinear) is a lazy module") and err.count("\n") == 1


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
