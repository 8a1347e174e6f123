"""The tracer and the dtype graph on real models."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, snapshot
from torch import nn

import dtypelint
from dtypelint import Tracer, UsageError


class EveryKindOfOp(nn.Module):
    """Functional calls, tensor methods, an in-place op, factories, a buffer and a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8).half()
        self.register_buffer("scale", torch.full((8,), 2.0))
        self.offset = torch.ones(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.proj.weight, self.proj.bias)
        h = h.float() * self.scale
        h.add_(self.offset)
        positions = torch.arange(8, dtype=torch.float32)
        fill = torch.full((8,), 0.5)
        return torch.matmul(h, torch.diag(positions + fill))


def op_names(graph: dtypelint.DtypeGraph) -> list[str]:
    return [graph.nodes[op]["name"] for op in graph.ops()]


def test_tiny_llama_graph_has_fp32_inv_freq_feeding_rotary_ops(tiny_llama_fp16, input_ids):
    graph = dtypelint.trace(tiny_llama_fp16, {"input_ids": input_ids})
    inv_freq = graph.find_tensor("model.rotary_emb.inv_freq")
    assert inv_freq is not None
    assert graph.nodes[inv_freq]["origin"] == "buffer"
    assert graph.nodes[inv_freq]["dtype"] == "float32"
    assert graph.in_degree(inv_freq) == 0
    consumers = graph.consumers(inv_freq)
    assert consumers and all(graph.nodes[op]["module"] == "model.rotary_emb" for op in consumers)
    # q and k projections run in float16.
    for projection in ("q_proj", "k_proj"):
        module = f"model.layers.0.self_attn.{projection}"
        matmuls = [op for op in graph.ops() if graph.nodes[op]["module"] == module and graph.nodes[op]["name"] == "aten.mm"]
        assert matmuls, module
        assert {graph.nodes[t]["dtype"] for t in graph.outputs(matmuls[0])} == {"float16"}
        weight = graph.find_tensor(f"{module}.weight")
        assert weight in graph.leaves(graph.outputs(matmuls[0])[0])


def test_records_every_kind_of_op_with_origins_and_modules():
    model = EveryKindOfOp().eval()
    graph = dtypelint.trace(model, torch.randn(2, 8, dtype=torch.float16))
    names = op_names(graph)
    for expected in ("aten.addmm", "aten._to_copy", "aten.mul", "aten.add_", "aten.arange", "aten.full", "aten.mm"):
        assert expected in names, expected
    origins = {graph.nodes[t]["name"]: graph.nodes[t]["origin"] for t in graph.tensors() if graph.nodes[t]["name"]}
    assert origins["proj.weight"] == "parameter"
    assert origins["scale"] == "buffer"
    assert origins["offset"] == "attribute"
    assert origins["x"] == "input"
    assert origins["aten.arange"] == "constant"
    # The in-place add makes a new version of h: the graph stays acyclic.
    assert nx.is_directed_acyclic_graph(graph)
    add_ = next(op for op in graph.ops() if graph.nodes[op]["name"] == "aten.add_")
    assert graph.nodes[add_]["inplace"]
    assert len(graph.outputs(add_)) == 1 and graph.outputs(add_)[0] not in [t for t, _ in graph.inputs(add_)]


def test_ops_are_attributed_to_the_innermost_module(tiny_llama_fp16, input_ids):
    graph = dtypelint.trace(tiny_llama_fp16, input_ids)
    modules = {graph.nodes[op]["module"] for op in graph.ops()}
    assert {"model.embed_tokens", "model.layers.1.mlp.down_proj", "model.norm", "lm_head"} <= modules


class CallsAModuleOutsideItsTree(nn.Module):
    """Calls a module it does not register, as transformers >= 5.25 calls its hub-kernel functions
    (``apply_rotary_pos_emb`` is a ``Func`` module instance when the ``kernels`` package is installed)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        object.__setattr__(self, "helper", nn.Tanh())  # not a submodule: no state-dict path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.helper(self.proj(x))


def test_a_module_outside_the_models_tree_runs_as_part_of_its_caller():
    model = nn.Sequential(CallsAModuleOutsideItsTree())
    graph = dtypelint.trace(model, torch.randn(2, 8))
    tanh = [op for op in graph.ops() if graph.op(op)["name"] == "aten.tanh"]
    assert [graph.op(op)["module"] for op in tanh] == ["0"]


def test_autocast_records_post_autocast_dtypes_and_no_false_mixed_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = dtypelint.audit(model, torch.randn(2, 8))
    assert not [f for f in report.findings if f.category == "mixed-input"], report
    graph = report.graph
    matmuls = [op for op in graph.ops() if graph.nodes[op]["name"] in ("aten.addmm", "aten.mm")]
    assert matmuls
    for op in matmuls:
        assert {graph.nodes[t]["dtype"] for t in graph.floating_inputs(op)} == {"bfloat16"}


def test_explicit_casts_are_not_conflicts():
    class Casts(nn.Module):
        def forward(self, x):
            return x.float().half().to(torch.bfloat16).to(torch.float32)

    graph = dtypelint.trace(Casts(), torch.randn(4, dtype=torch.float16))
    assert list(graph.dtype_conflicts()) == []
    report = dtypelint.audit(Casts(), torch.randn(4, dtype=torch.float16))
    assert report.findings == []


def test_failing_forward_keeps_trace_and_records_the_failing_op(stray_fp32_layer):
    x = torch.randn(3, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError):
        stray_fp32_layer(x)
    before = snapshot(stray_fp32_layer)
    graph = dtypelint.trace(stray_fp32_layer, x)
    failed = [op for op in graph.ops() if graph.nodes[op]["failed"]]
    assert len(failed) == 1
    op = failed[0]
    assert graph.nodes[op]["module"] == "head"
    # The trace went past the refusal on the operands cast to the model's dtype (float16 holds most elements).
    assert op == list(graph.ops())[-1] and [graph.nodes[t]["dtype"] for t in graph.outputs(op)] == ["float16"]
    assert {graph.nodes[t]["dtype"] for t in graph.floating_inputs(op)} == {"float16", "float32"}
    assert "head.weight" in {graph.nodes[t]["name"] for t in graph.leaves(graph.inputs(op)[-1][0])}
    assert "same dtype" in graph.graph["error"]
    assert_unchanged(stray_fp32_layer, before)


def test_audit_leaves_model_and_global_state_untouched(tiny_llama_fp16, input_ids):
    before = snapshot(tiny_llama_fp16)
    grad, default = torch.is_grad_enabled(), torch.get_default_dtype()
    dtypelint.audit(tiny_llama_fp16, {"input_ids": input_ids})
    assert_unchanged(tiny_llama_fp16, before)
    assert torch.is_grad_enabled() == grad and torch.get_default_dtype() == default


def test_state_restored_when_forward_changes_it_and_raises():
    class Rude(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            torch.set_default_dtype(torch.float64)
            torch.set_grad_enabled(True)
            self.lin(x)
            raise ValueError("boom")

    model = Rude()
    before = snapshot(model)
    with torch.no_grad():
        report = dtypelint.audit(model, torch.randn(2, 4))
        assert not torch.is_grad_enabled()
    assert torch.get_default_dtype() == torch.float32
    assert_unchanged(model, before)
    assert [f.code for f in report.findings] == ["DT001"]
    assert "ValueError: boom" in report.findings[0].message


def test_value_statistics_are_recorded_for_half_precision_when_asked():
    model = nn.Linear(4, 4).half().eval()
    x = torch.full((1, 4), 3.0, dtype=torch.float16)
    graph = dtypelint.trace(model, x, stats=True)
    addmm = next(op for op in graph.ops() if graph.nodes[op]["name"] == "aten.addmm")
    output = graph.nodes[graph.outputs(addmm)[0]]
    expected = model(x)
    assert output["min"] == pytest.approx(expected.min().item())
    assert output["max"] == pytest.approx(expected.max().item())
    assert all("min" not in data for _, data in dtypelint.trace(model, x).nodes(data=True))
    # float32 is not measured: its range is not the risk, and measuring it would double the cost. What the
    # forward returns is, whatever its dtype: whether inf or NaN reaches the output is then measured.
    wide = dtypelint.trace(model.float(), x.float(), stats=True)
    assert [data.get("returned", False) for _, data in wide.nodes(data=True) if "min" in data] == [True]


def test_compiled_model_is_audited_through_its_original(stray_fp32_layer):
    compiled = torch.compile(stray_fp32_layer)
    report = dtypelint.audit(compiled, torch.randn(2, 16, dtype=torch.float16))
    assert any("_orig_mod" in note for note in report.notes)
    assert any(f.code == "DT101" and f.tensor == "head.weight" for f in report.findings)


def test_tracer_context_manager_removes_its_hooks_when_the_forward_raises(stray_fp32_layer):
    with pytest.raises(RuntimeError), Tracer(stray_fp32_layer) as tracer:
        hooks = torch.nn.modules.module
        assert hooks._global_forward_hooks and hooks._global_forward_pre_hooks
        stray_fp32_layer(torch.randn(2, 16, dtype=torch.float16))
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks
    graph = dtypelint.DtypeGraph.from_tracer(tracer)
    assert graph.nodes[graph.failed_op()]["module"] == "head"


@pytest.mark.parametrize(
    "inputs", [None, "text", 3, {1: torch.ones(2)}], ids=["none", "string", "int", "non-string-key"]
)
def test_bad_inputs_raise_usage_error(stray_fp32_layer, inputs):
    with pytest.raises(UsageError):
        dtypelint.audit(stray_fp32_layer, inputs)


def test_non_module_raises_usage_error():
    with pytest.raises(UsageError, match="torch.nn.Module"):
        dtypelint.audit(lambda x: x, torch.ones(2))


def test_meta_device_model_needs_meta_mode():
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    with pytest.raises(UsageError, match="meta"):
        dtypelint.audit(model, torch.ones(1, 4))
    report = dtypelint.audit(model, torch.ones(1, 4), mode="meta")
    assert report.mode == "meta" and report.findings == []
    assert any(graph_op == "aten.addmm" for graph_op in op_names(report.graph))
    assert model.weight.device.type == "meta"


def test_tracer_reports_each_module_call_for_progress(stray_fp32_layer):
    calls = []
    with Tracer(stray_fp32_layer, on_module=lambda: calls.append(1)):
        stray_fp32_layer.body(torch.randn(2, 16, dtype=torch.float16))
    assert len(calls) == 4  # the Sequential and its three children


class NestedInputs(nn.Module):
    """A forward whose tensors arrive nested two levels deep, as a key/value cache does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4).half()

    def forward(self, cache: dict) -> torch.Tensor:
        return self.proj(cache["layers"][0][1].half()) + cache["layers"][1][0]


@pytest.mark.parametrize("mode", ["value", "meta"])
def test_nested_inputs_keep_their_input_origin_and_name(mode):
    cache = {"layers": [(torch.randn(2, 4), torch.randn(2, 4)), (torch.randn(2, 4, dtype=torch.float16), None)]}
    graph = dtypelint.trace(NestedInputs(), (cache,), mode=mode)
    inputs = {graph.tensor(node)["name"] for node in graph.tensors() if graph.tensor(node)["origin"] == "input"}
    assert inputs == {"cache['layers'][0][1]", "cache['layers'][1][0]"}


def test_a_composite_call_that_raises_before_dispatch_is_recorded() -> None:
    """F.conv2d checks input against bias before any aten op is dispatched: the call itself is recorded."""
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3).half())
    model.conv.bias.data = model.conv.bias.data.float()
    report = dtypelint.audit(model, (torch.randn(1, 3, 8, 8, dtype=torch.float16),))
    error = report.by_code("DT001")[0]
    assert (error.location, error.op, error.dtypes) == ("conv", "aten.conv2d", ["float16", "float16", "float32"])
    mixed = report.by_code("DT101")[0]
    assert (mixed.location, mixed.tensor) == ("conv", "conv.bias")


def test_a_composite_call_that_succeeds_adds_no_record() -> None:
    model, x = nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    with Tracer(model) as tracer:
        model(x)
    assert [str(record.func) for record in tracer.records] == ["aten.convolution.default"]


def check_same_dtype(q: torch.Tensor, k: torch.Tensor) -> None:
    """A library's Python-side input check (xformers, NATTEN): it raises before any op runs."""
    if q.dtype != k.dtype:
        raise ValueError(f"query and key should have the same dtype: {q.dtype}, {k.dtype}")


class PythonChecked(nn.Module):
    def __init__(self, message: str = "") -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4).half()
        self.message = message

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q(x), self.k(x.half())
        if self.message:
            raise RuntimeError(self.message)
        check_same_dtype(q, k)
        return q


def test_a_dtype_error_raised_in_python_is_recorded_as_a_call_with_its_frame_tensors() -> None:
    model = nn.Sequential()
    model.add_module("attn", PythonChecked())
    report = dtypelint.audit(model, torch.randn(2, 4))
    error = report.by_code("DT001")[0]
    assert (error.location, error.op, error.dtypes) == ("attn", "python.check_same_dtype", ["float32", "float16"])
    mixed = report.by_code("DT101")[0]
    assert (mixed.location, mixed.op) == ("attn", "python.check_same_dtype")


def test_another_python_error_is_located_in_its_module_without_a_call() -> None:
    model = nn.Sequential()
    model.add_module("attn", PythonChecked(message="sequence too long"))
    report = dtypelint.audit(model, torch.randn(2, 4))
    assert [(f.code, f.location, f.op) for f in report.errors] == [("DT001", "attn", None)]
    assert not [op for op in report.graph.ops() if report.graph.op(op)["name"].startswith("python.")]


class RebuiltTable(nn.Module):
    """Rebuilds a float32 buffer in forward (timm's ``rel_indices`` for a new size) for a half linear."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 4).half()
        self.register_buffer("table", torch.zeros(1, 2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.table = torch.stack([torch.arange(x.shape[0]).float(), torch.ones(x.shape[0])], -1)
        return self.proj(self.table) + x


def test_a_buffer_assigned_in_forward_is_named_as_the_culprit() -> None:
    model = RebuiltTable().eval()
    report = dtypelint.audit(model, torch.randn(3, 4).half())
    mixed = report.by_code("DT101")[0]
    assert (mixed.location, mixed.tensor) == ("proj", "table")
    assert "buffer table (assigned in forward" in mixed.message
    assert [node for node, data in report.graph.nodes(data=True) if data.get("stored_name") == "table"]


class TwoStrayLayers(torch.nn.Module):
    """A float16 residual MLP with two layers re-created in float32: each refuses its float16 input."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4)).half()
        self.layers[1], self.layers[3] = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def test_the_trace_goes_past_a_refused_kernel_and_finds_the_error_behind_it():
    torch.manual_seed(0)
    model, x = TwoStrayLayers().eval(), torch.randn(2, 16, dtype=torch.float16)
    before = snapshot(model)
    report = dtypelint.audit(model, x, dtype="float16")
    errors = [(finding.code, finding.location) for finding in report.errors]
    # The forward raises at the first; the second is found on the way on, and nothing past them: the refused
    # layers ran on operands cast to float16, so the residual stream stays float16.
    assert errors == [("DT001", "layers.1"), ("DT101", "layers.1"), ("DT101", "layers.3")]
    assert not [finding for finding in report.findings if finding.code == "DT102"]
    assert "same dtype" in report.graph.graph["error"]
    assert any(note.startswith("the trace went on past 2 kernels that refused a mix of dtypes") for note in report.notes)
    assert_unchanged(model, before)


def test_the_trace_stops_at_a_refused_kernel_past_its_budget():
    from dtypelint.graph import DtypeGraph
    from dtypelint.tracer import Tracer

    torch.manual_seed(0)
    model = TwoStrayLayers().eval()
    tracer = Tracer(model, go_past=1)
    with pytest.raises(RuntimeError, match="same dtype"), tracer:
        model(torch.randn(2, 16, dtype=torch.float16))
    assert len(tracer.refusals) == 1
    graph = DtypeGraph.from_tracer(tracer)
    failed = [graph.nodes[op]["module"] for op in graph.ops() if graph.nodes[op]["failed"]]
    assert failed == ["layers.1", "layers.3"]  # the first gone past, the second where the forward stopped
