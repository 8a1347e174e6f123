"""Issue #12, mechanism 7: autocast as the deployment's device runs it. The trace records which ops are
casts autocast made (the dtype the code passed -> the one the kernel received); a pack with
``autocast = "cuda"`` applies CUDA's lists, so a kernel outside them is judged on what CUDA hands it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dtypelint
from dtypelint.autocast import POLICIES


class NormThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def autocast_casts(graph: dtypelint.DtypeGraph) -> list[tuple[str, str, str]]:
    """(module, dtype passed, dtype received) of every cast autocast made."""
    return [
        (graph.op(op)["module"], graph.tensor(graph.inputs(op)[0][0])["dtype"], graph.tensor(graph.outputs(op)[0])["dtype"])
        for op in graph.ops() if graph.op(op)["autocast"]
    ]


def traced(backend: str | None, autocast: bool) -> dtypelint.Report:
    model, x = NormThenLinear().eval(), torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return dtypelint.audit(model, x, dtype="bfloat16", **({"backend": backend} if backend else {}))


def test_cpu_autocast_casts_of_a_linear_are_marked_and_a_norm_keeps_the_stream_dtype():
    graph = traced(None, autocast=True).graph
    assert autocast_casts(graph) == [("proj", "float32", "bfloat16")] * 3  # input, weight and bias
    norm = next(op for op in graph.ops() if graph.op(op)["name"] == "aten.native_layer_norm")
    assert graph.tensor(graph.inputs(norm)[0][0])["dtype"] == "bfloat16"


def test_cuda_autocast_upcasts_the_norm_input_and_marks_that_cast():
    graph = traced("cuda", autocast=True).graph
    assert ("norm", "bfloat16", "float32") in autocast_casts(graph)
    norm = next(op for op in graph.ops() if graph.op(op)["name"] == "aten.native_layer_norm")
    assert graph.tensor(graph.outputs(norm)[0])["dtype"] == "float32"
    assert graph.graph["autocast_policy"] == "cuda"


def test_without_autocast_nothing_is_cast():
    assert autocast_casts(traced("cuda", autocast=False).graph) == []


def test_a_call_autocast_is_disabled_for_is_left_alone():
    model = NormThenLinear().eval()

    class Disabled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", enabled=False):
                return model(x)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = dtypelint.audit(Disabled().eval(), torch.randn(2, 8), backend="cuda")
    assert autocast_casts(report.graph) == []


def test_policies_know_the_python_spellings_of_their_ops():
    cuda = POLICIES["cuda"]
    assert {F.linear, torch.Tensor.__matmul__, torch.matmul} <= cuda.lower
    assert {F.layer_norm, torch.softmax, torch.Tensor.softmax, torch.Tensor.__pow__} <= cuda.float32
    assert not POLICIES["cpu"].float32


class HalfModelFloatNorm(nn.Module):
    """A float16 model whose LayerNorm stayed float32: CUDA's kernel refuses it, unless autocast upcasts."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8).half()
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def test_a_cuda_contract_is_judged_on_what_the_kernel_receives_under_autocast():
    model, x = HalfModelFloatNorm().eval(), torch.randn(2, 8).half()
    plain = dtypelint.audit(model, x, backend="cuda")
    with torch.autocast("cpu", dtype=torch.float16):
        autocast = dtypelint.audit(model, x, backend="cuda")
    assert {f.code for f in plain.errors} == {"CUDA101"}  # weight and bias
    assert autocast.errors == []
