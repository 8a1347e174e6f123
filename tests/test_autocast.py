"""Issue #12, mechanism 7: autocast as the deployment's device runs it. The trace records which ops are
casts autocast made (the dtype the code passed -> the one the kernel received); a pack with
``autocast = "cuda"`` applies CUDA's lists, so a kernel outside them is judged on what CUDA hands it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import NormThenLinear
from torch import nn

import dtypelint
from dtypelint.autocast import POLICIES


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
    assert torch.linalg.vector_norm in cuda.float32  # aten's linalg_vector_norm
    assert not {F.layer_norm, torch.softmax} & POLICIES["cpu"].float32  # CPU keeps norms in the autocast dtype


def test_the_policies_are_the_installed_torchs_own_registrations():
    """Read from the Autocast<DEVICE> kernels themselves, as measured on an H100's torch
    (../shared/reference/cuda-dtype-facts.md): every op the reading sorts has a kernel for the key, and
    the float32 list has rms_norm where this torch registers it (2.12 and newer), not mean."""
    for device, key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):
        policy = POLICIES[device]
        assert policy.torch_version == torch.__version__ and policy.lower_ops and not policy.lower_ops & policy.float32_ops
        registered = {name.removeprefix("aten::").partition(".")[0] for name in torch._C._dispatch_get_all_op_names()
                      if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, key)}
        assert policy.lower_ops | policy.float32_ops <= registered
    cuda = POLICIES["cuda"]
    assert {"layer_norm", "group_norm", "softmax", "exp", "pow", "sum", "cumsum"} <= cuda.float32_ops
    assert {"linear", "matmul", "mm", "scaled_dot_product_attention", "conv2d"} <= cuda.lower_ops
    assert "mean" not in cuda.float32_ops | cuda.lower_ops
    registers_rms_norm = torch._C._dispatch_has_kernel_for_dispatch_key("aten::rms_norm", "AutocastCUDA")
    assert ("rms_norm" in cuda.float32_ops) == registers_rms_norm and (F.rms_norm in cuda.float32) == registers_rms_norm


@torch.library.custom_op("dtypelint_test::attend", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A kernel outside autocast's lists (as flash-attn's): it takes one dtype and says so."""
    if not q.dtype == k.dtype == v.dtype:
        raise RuntimeError(f"attend: expected q, k and v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


@attend.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not q.dtype == k.dtype == v.dtype:
        raise RuntimeError(f"attend: expected q, k and v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return torch.empty_like(v)


class RMSNormedQueryKey(nn.Module):
    """q and k through torch's RMSNorm (diffusers' attention processors, fused-norm swaps), v not, into a
    kernel autocast does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.q_norm, self.k_norm = nn.RMSNorm(8), nn.RMSNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return attend(self.q_norm(self.q(x)), self.k_norm(self.k(x)), self.v(x))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's unfused RMSNorm path
def test_rms_normed_query_and_key_under_cuda_autocast_meet_a_bfloat16_value_where_torch_registers_it():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::rms_norm", "AutocastCUDA"):
        pytest.skip("this torch keeps rms_norm off CUDA's float32 list (before 2.12)")
    model, x = RMSNormedQueryKey().eval(), torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        on_cuda = dtypelint.audit(model, x, backend="cuda")
        on_cpu = dtypelint.audit(model, x)
    (error,) = on_cuda.by_code("DT001")
    assert error.dtypes == ["float32", "float32", "bfloat16"] and "attend" in error.message
    assert any(f"torch {torch.__version__}'s own registrations" in note and "rms_norm" in note for note in on_cuda.notes)
    assert on_cpu.errors == [] and on_cpu.judged["DT001"] > 0  # CPU autocast leaves RMSNorm in bfloat16


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


def test_a_transformers_model_with_torchs_rmsnorm_is_upcast_under_cuda_autocast_only():
    """DiffLlama normalizes its attention output with ``nn.RMSNorm``: under CUDA's policy (torch >= 2.12)
    its input is upcast to float32, under CPU's it stays bfloat16; each report names the policy it read."""
    transformers = pytest.importorskip("transformers")
    if "diffllama" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no DiffLlama")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::rms_norm", "AutocastCUDA"):
        pytest.skip("this torch keeps rms_norm off CUDA's float32 list (before 2.12)")
    config = transformers.AutoConfig.for_model("diffllama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    inputs = {"input_ids": torch.randint(0, 128, (1, 8))}
    norms = {}
    for device, backend in (("cuda", "cuda"), ("cpu", "hf-eager")):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            report = dtypelint.audit(model, inputs, backend=backend)
        norms[device] = {cast for cast in autocast_casts(report.graph) if cast[0].endswith("self_attn.groupnorm")}
        assert any(note.startswith(f"autocast as {device} runs it, read from torch {torch.__version__}")
                   for note in report.notes)
    assert norms["cuda"] == {(f"model.layers.{i}.self_attn.groupnorm", "bfloat16", "float32") for i in range(2)}
    assert norms["cpu"] == set()
