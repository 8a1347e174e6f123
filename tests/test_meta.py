"""Meta mode: audits from a config, with fake tensors and no weight memory."""

from __future__ import annotations

import json
import resource

import pytest
import torch
from helpers import EXAMPLES
from torch import nn

import dtypelint
from dtypelint import LoadError, UsageError


def layer_ops(graph):
    return [
        (graph.nodes[op]["module"], graph.nodes[op]["name"])
        for op in graph.ops()
        if graph.nodes[op]["module"].startswith("model.layers.") and not graph.nodes[op]["module"].endswith("self_attn")
    ]


def test_config_audit_traces_the_same_ops_as_value_mode(tiny_llama_path, tiny_llama_fp16, input_ids):
    meta = dtypelint.audit_config(tiny_llama_path / "config.json", dtype="float16", seq_len=8)
    value = dtypelint.audit(tiny_llama_fp16, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
    assert meta.mode == "meta" and value.mode == "value"
    meta_ops = layer_ops(meta.graph)
    value_ops = layer_ops(value.graph)
    assert {"aten.mm", "aten.rsqrt", "aten._to_copy"} <= {name for _, name in meta_ops}
    inv_freq = meta.graph.find_tensor("model.rotary_emb.inv_freq")
    assert meta.graph.nodes[inv_freq]["dtype"] == "float32"
    assert meta.graph.nodes[inv_freq]["device"] == "cpu"
    weight = meta.graph.find_tensor("model.layers.0.self_attn.q_proj.weight")
    assert meta.graph.nodes[weight]["dtype"] == "float16"
    # Projections, norms and MLPs run the same ops. Attention differs: on real all-ones masks transformers
    # skips the mask, on fake ones it cannot tell and passes it.
    assert meta_ops == value_ops


def test_config_dtype_is_the_default(tiny_llama_path):
    assert dtypelint.audit_config(tiny_llama_path).compute_dtype == "float16"
    assert dtypelint.audit_config(tiny_llama_path, dtype="bf16").compute_dtype == "bfloat16"


def test_llama_3_70b_config_audits_in_meta_mode_without_weight_memory():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = dtypelint.audit_config(EXAMPLES / "configs" / "llama-3-70b", dtype="float16")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert report.graph.graph["error"] is None
    assert report.findings == []
    layers = {report.graph.nodes[op]["module"].split(".")[2] for op in report.graph.ops()
              if report.graph.nodes[op]["module"].startswith("model.layers.")}
    assert len(layers) == 80
    # 140 GB of float16 weights were never allocated.
    assert grown_mb < 1500


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        keep = h.nonzero()
        return h[keep[:, 0]]


def test_data_dependent_op_in_meta_mode_is_a_trace_limit_finding():
    model = DataDependent()
    report = dtypelint.audit(model, torch.randn(2, 4), mode="meta")
    assert [f.code for f in report.findings] == ["DT002"]
    finding = report.findings[0]
    assert finding.category == "trace-limit" and finding.severity == "warning"
    assert finding.op == "aten.nonzero"
    # Value mode runs it for real.
    assert dtypelint.audit(model, torch.randn(2, 4)).findings == []


def test_meta_mode_of_a_real_model_leaves_it_untouched(stray_fp32_layer):
    before = {name: t.clone() for name, t in stray_fp32_layer.state_dict().items()}
    report = dtypelint.audit(stray_fp32_layer, torch.randn(2, 16, dtype=torch.float16), mode="meta")
    assert any(f.code == "DT101" and f.tensor == "head.weight" for f in report.findings)
    for name, tensor in stray_fp32_layer.state_dict().items():
        assert torch.equal(tensor, before[name]) and type(tensor) is torch.Tensor


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        dtypelint.audit_config(tmp_path / "missing")
    with pytest.raises(LoadError, match="no config.json"):
        dtypelint.audit_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        dtypelint.audit_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(LoadError, match="no-such-model"):
        dtypelint.audit_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(UsageError, match="remote code"):
        dtypelint.audit_config(tmp_path)
    with pytest.raises(UsageError, match="unknown dtype"):
        dtypelint.audit_config(EXAMPLES / "tiny-llama", dtype="float13")
    with pytest.raises(UsageError, match="unknown backend"):
        dtypelint.audit_config(EXAMPLES / "tiny-llama", backend="tpu-magic")


def test_config_audit_leaves_the_callers_config_untouched(tiny_llama_path):
    from dtypelint.load import load_config

    config = load_config(tiny_llama_path)
    before = config.to_dict()
    dtypelint.audit_config(config, dtype="bfloat16")
    assert config.to_dict() == before


def test_a_meta_function_narrower_than_the_kernel_is_a_trace_limit_not_a_broken_model():
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, num_local_experts=4, num_experts_per_tok=2,
    )
    report = dtypelint.audit_config(config, dtype="float16")
    codes = [f.code for f in report.findings]
    if "aten._grouped_mm" not in {report.graph.nodes[op]["name"] for op in report.graph.ops()}:
        pytest.skip("this transformers routes mixtral's experts without aten._grouped_mm")
    assert "DT001" not in codes and "DT002" in codes
    limit = report.by_code("DT002")[0]
    assert limit.op == "aten._grouped_mm" and "BF16" in limit.message


class SinusoidalPositions(nn.Module):
    """GPT-J keeps its position table as a plain tensor attribute, not a buffer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.table = torch.ones(8, 4)

    def forward(self, x):
        return self.lin(x) + self.table[: x.shape[0]]


def test_meta_mode_swaps_plain_tensor_attributes_for_the_call_only():
    with torch.device("meta"):
        model = SinusoidalPositions()
    table = model.table
    report = dtypelint.audit(model, torch.ones(2, 4), mode="meta")
    assert report.findings == [] and report.graph.graph["error"] is None
    assert report.graph.nodes[report.graph.find_tensor("table")]["origin"] == "attribute"
    assert model.table is table and table.device.type == "meta"


def test_a_fake_kernel_failure_is_one_trace_limit_finding_not_a_log_on_stderr(capfd):
    """A meta kernel narrower than the real one (``_grouped_mm``'s takes bfloat16 only) logs its traceback on
    torch's own stderr handler; dtypelint keeps its first line in DT002 and prints nothing."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "afmoe" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no AFMoE (it came with transformers 5)")
    config = AutoConfig.for_model(
        "afmoe", vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, num_shared_experts=1, layer_types=["full_attention"] * 2,
    )
    report = dtypelint.audit_config(config, dtype="float16")
    [limit] = report.by_code("DT002")
    assert "aten._grouped_mm" in limit.message
    assert "torch logged: failed while attempting to run meta for aten._grouped_mm" in limit.message
    assert "fake_tensor.py" not in capfd.readouterr().err
