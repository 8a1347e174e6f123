"""Issue #22, item 3: the audit judges the path the deployment runs. The ops dtypelint records are the ops a
bare recording dispatch mode sees on the same call; a ``TorchFunctionMode`` (whose presence alone turns off
``nn.TransformerEncoderLayer``'s and ``nn.MultiheadAttention``'s fast paths) is entered only where it is
needed, and the report says so where it could have changed a path."""

from __future__ import annotations

import pytest
import torch
from helpers import NormThenLinear, dispatched_ops, first_difference, recorded_ops
from torch import nn

import dtypelint

FUSED_LAYER = "aten._transformer_encoder_layer_fwd.default"
FUSED_ATTENTION = "aten._native_multi_head_attention.default"


def encoder(dtype: torch.dtype) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval().to(dtype)


def assert_same_ops(model: nn.Module, inputs: object, report: dtypelint.Report) -> list[str]:
    dispatched = dispatched_ops(model, inputs)
    assert first_difference(dispatched, recorded_ops(report.graph)) is None
    return dispatched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transformer_encoder_keeps_its_fused_fast_path(dtype):
    model, x = encoder(dtype), torch.randn(2, 5, 16, dtype=dtype)
    assert assert_same_ops(model, x, dtypelint.audit(model, x)) == [FUSED_LAYER] * 2


def padded_batch(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"src": torch.randn(2, 5, 16, dtype=dtype),
            "src_key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2])}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transformer_encoder_with_a_padding_mask_keeps_its_nested_tensor_path(dtype):
    """The fast path packs the padded batch into a nested tensor, which has no shape; its values are measured."""
    model, inputs = encoder(dtype), padded_batch(dtype)
    report = dtypelint.audit(model, inputs)
    dispatched = assert_same_ops(model, inputs, report)
    assert dispatched.count(FUSED_LAYER) == 2 and "aten._nested_tensor_from_mask.default" in dispatched
    assert report.findings == [] and report.graph.graph["stats"]


def test_meta_mode_takes_the_general_path_where_fake_tensors_cannot_follow_the_fast_one():
    """Fake tensors cannot make the nested tensor: the forward is traced again on the general path, and said so."""
    report = dtypelint.audit(encoder(torch.float16), padded_batch(torch.float16), mode="meta")
    assert report.graph.graph["error"] is None and report.findings == []
    assert FUSED_LAYER not in recorded_ops(report.graph)
    (note,) = [note for note in report.notes if "function-level recording" in note]
    assert "fake tensors" in note and "layers.0 (TransformerEncoderLayer)" in note


def test_meta_mode_keeps_a_fast_path_fake_tensors_can_run():
    model, x = encoder(torch.float16), torch.randn(2, 5, 16, dtype=torch.float16)
    report = dtypelint.audit(model, x, mode="meta")
    assert recorded_ops(report.graph) == [FUSED_LAYER] * 2 and report.notes == []


def test_self_attention_keeps_the_fused_multihead_attention_path():
    """The fast path wants ``query is key is value``: the copies dtypelint makes of the inputs keep that."""
    torch.manual_seed(0)
    model, x = nn.MultiheadAttention(16, 4, batch_first=True).eval(), torch.randn(2, 5, 16)
    assert assert_same_ops(model, (x, x, x), dtypelint.audit(model, (x, x, x))) == [FUSED_ATTENTION]


def test_tiny_llama_records_the_ops_it_dispatches(tiny_llama_fp16, input_ids):
    inputs = {"input_ids": input_ids}
    report = dtypelint.audit(tiny_llama_fp16, inputs)
    assert report.steps == 2  # the decode step ran under the same modes as the first call compared here
    assert "aten.mm.default" in assert_same_ops(tiny_llama_fp16, inputs, report)


def test_autocast_policy_needs_the_function_level_and_the_report_names_the_paths_it_changes():
    model, x = encoder(torch.float32), torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = dtypelint.audit(model, x)
        dispatched = dispatched_ops(model, x)
    assert dispatched == [FUSED_LAYER] * 2  # CPU autocast alone leaves the fast path on
    assert FUSED_LAYER not in recorded_ops(report.graph)
    (note,) = [note for note in report.notes if "function-level recording" in note]
    assert "autocast policy" in note and "layers.0 (TransformerEncoderLayer)" in note


def test_no_path_note_without_a_module_that_checks_for_function_modes():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = dtypelint.audit(model, torch.randn(2, 8))
    assert any(data["autocast"] for data in map(report.graph.op, report.graph.ops()))  # the policy applied
    assert not [note for note in report.notes if "function-level recording" in note]


class EncoderThen(nn.Module):
    """An encoder on its fast path, then a layer whose dtype check fails: ``head`` decides where."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder(torch.float16)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class PythonCheck(nn.Module):
    """A library's Python-side dtype check (xformers): it raises before any op runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise ValueError(f"expected float32 input, got dtype {x.dtype}")
        return x


def test_a_failing_python_check_keeps_the_trace_of_the_deployment_path():
    """The function-level second trace records nothing more (no composite call failed), so the first is kept."""
    model, x = EncoderThen(PythonCheck()).eval(), torch.randn(2, 5, 16, dtype=torch.float16)
    report = dtypelint.audit(model, x)
    with pytest.raises(ValueError):
        dispatched_ops(model, x)
    assert recorded_ops(report.graph) == [FUSED_LAYER] * 2
    assert report.by_code("DT001") and not [note for note in report.notes if "function-level" in note]


def test_a_call_that_raises_before_dispatch_is_recorded_by_a_second_trace_that_says_what_it_changed():
    """F.conv1d checks its input against its bias before any op is dispatched: only a function mode sees the
    call, and that mode sends the encoder off its fast path, which the report says."""
    head = nn.Conv1d(5, 4, 3).half()
    head.bias.data = head.bias.data.float()
    report = dtypelint.audit(EncoderThen(head).eval(), torch.randn(2, 5, 16, dtype=torch.float16))
    error = report.by_code("DT001")[0]
    assert (error.location, error.op) == ("head", "aten.conv1d")
    assert FUSED_LAYER not in recorded_ops(report.graph)
    (note,) = [note for note in report.notes if "function-level recording" in note]
    assert "raised before dispatch" in note and "encoder.layers.0 (TransformerEncoderLayer)" in note


class InnerAutocast(NormThenLinear):
    """A forward that turns CPU autocast on itself, around a linear and a norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().forward(x)


def test_autocast_turned_on_inside_the_forward_gets_the_deployments_policy():
    report = dtypelint.audit(InnerAutocast().eval(), torch.randn(2, 8), backend="cuda")
    graph = report.graph
    norm = next(op for op in graph.ops() if graph.op(op)["name"] == "aten.native_layer_norm")
    assert graph.tensor(graph.inputs(norm)[0][0])["dtype"] == "float32"  # CUDA's float32 list, not CPU's
    assert graph.op(graph.producer(graph.inputs(norm)[0][0]))["autocast"]
