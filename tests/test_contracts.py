"""The ipex-llm-xpu kernel contracts (IPX101..IPX108) on real tiny models, in the main environment.

transformers 5 lays RoPE out with one model-level rotary module (``model.rotary_emb``); the per-layer
layout that ipex-llm's pinned transformers 4.37 has is rebuilt here by attaching a copy of it to each
attention layer. Every contract is shown both raising its alarm and staying silent.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, per_layer_rotary, snapshot
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GemmaForCausalLM,
    LlamaForCausalLM,
    PhiForCausalLM,
    Qwen2ForCausalLM,
)

import dtypelint
from dtypelint.load import dtype_keyword

IPEX = "ipex-llm-xpu"
HF = "hf-eager"
LAYERS = 2
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}
# Imported here, not lazily by the first from_config, so that no test pays for importing its modeling code.
CAUSAL_LM = {
    "llama": LlamaForCausalLM, "gemma": GemmaForCausalLM, "phi": PhiForCausalLM, "qwen2": Qwen2ForCausalLM,
}


def tiny(model_type: str, dtype: torch.dtype, **overrides) -> nn.Module:
    """A random tiny causal LM of ``model_type`` built from its config in ``dtype``."""
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, **{dtype_keyword(): dtype}).eval()
    assert type(model) is CAUSAL_LM[model_type] and model.dtype == dtype
    return model


def tiny_llama(dtype: torch.dtype = torch.float16, **overrides) -> nn.Module:
    return tiny("llama", dtype, num_key_value_heads=2, **overrides)


def audit(model: nn.Module, inputs, backend: str = IPEX) -> dtypelint.Report:
    return dtypelint.audit(model, inputs, backend=backend)



def loud(report: dtypelint.Report) -> list[dtypelint.Finding]:
    return [finding for finding in report.findings if finding.severity in ("error", "warning")]


# IPX101 rotary inv_freq (per-layer layout) ------------------------------------------------------------


def test_per_layer_rotary_with_fp32_inv_freq_is_one_ipx101_error_per_layer(input_ids):
    model = tiny_llama()
    per_layer_rotary(model)
    assert model.model.layers[0].self_attn.rotary_emb.inv_freq.dtype == torch.float32
    before = snapshot(model)

    report = audit(model, {"input_ids": input_ids})

    errors = report.by_code("IPX101")
    assert [f.tensor for f in errors] == [
        f"model.layers.{layer}.self_attn.rotary_emb.inv_freq" for layer in range(LAYERS)
    ]
    for layer, finding in enumerate(errors):
        assert finding.severity == "error" and finding.category == "kernel-contract"
        assert finding.location == f"model.layers.{layer}.self_attn.rotary_emb"
        assert finding.op == "xe_addons.rotary_half_inplaced"
        assert finding.dtypes == ["float16", "float32"]
        assert finding.fix is not None and finding.fix.tensors == (finding.tensor,)
        assert finding.fix.to_dtype == "float16" and finding.fix.safety == "unsafe"
        assert finding.fix.description.startswith("cast to float16")
    assert loud(report) == errors  # the model-level rotary module (fp32 inv_freq, fp16 cos/sin) is fine
    assert_unchanged(model, before)


def test_per_layer_rotary_with_fp32_inv_freq_is_silent_under_hf_eager(input_ids):
    model = tiny_llama()
    per_layer_rotary(model)
    before = snapshot(model)

    assert loud(audit(model, {"input_ids": input_ids}, HF)) == []
    assert_unchanged(model, before)


def test_per_layer_rotary_is_silent_once_its_inv_freq_is_cast_to_fp16(input_ids):
    model = tiny_llama()
    per_layer_rotary(model)
    assert audit(model, {"input_ids": input_ids}).by_code("IPX101")  # the alarm first
    for layer in model.model.layers:
        rotary = layer.self_attn.rotary_emb
        rotary.inv_freq = rotary.inv_freq.to(torch.float16)

    report = audit(model, {"input_ids": input_ids})

    assert report.by_code("IPX101") == []
    assert loud(report) == []


def test_per_layer_rotary_of_a_bf16_llama_is_an_ipx101_unsupported_dtype_error_without_a_fix(input_ids):
    model = tiny_llama(torch.bfloat16)
    per_layer_rotary(model)

    errors = audit(model, {"input_ids": input_ids}).by_code("IPX101")

    assert len(errors) == LAYERS
    for finding in errors:
        assert "supports only float16, float32" in finding.message and "bfloat16" in finding.message
        assert finding.fix is None
    assert loud(audit(model, {"input_ids": input_ids}, HF)) == []


@pytest.mark.parametrize("backend", [HF, IPEX])
def test_model_level_rotary_of_an_unmodified_fp16_llama_is_silent(tiny_llama_fp16, input_ids, backend):
    model = tiny_llama_fp16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # correct in the model-level layout
    assert not hasattr(model.model.layers[0].self_attn, "rotary_emb")
    before = snapshot(model)

    report = audit(model, {"input_ids": input_ids}, backend)

    assert loud(report) == []
    assert_unchanged(model, before)


# IPX102 rotary cos/sin (model-level layout) -----------------------------------------------------------


def returning_fp32_cos_sin(model: nn.Module) -> nn.Module:
    """Replace the model-level rotary module's forward by one whose cos/sin are float32."""
    rotary = model.model.rotary_emb
    original = type(rotary).forward

    def forward(self, x, position_ids):
        cos, sin = original(self, x, position_ids)
        return cos.float(), sin.float()

    rotary.forward = types.MethodType(forward, rotary)
    return model


def test_model_level_rotary_returning_fp32_cos_sin_is_an_ipx102_error(input_ids):
    model = returning_fp32_cos_sin(tiny_llama())
    before = snapshot(model)

    report = audit(model, {"input_ids": input_ids})  # HF's own forward fails on fp32 q/k: still a report

    errors = report.by_code("IPX102")
    assert errors
    for finding in errors:
        assert finding.severity == "error" and finding.category == "kernel-contract"
        assert finding.location == "model.rotary_emb"
        assert finding.op == "xe_addons.rotary_half_with_cache_inplaced"
        assert finding.dtypes == ["float16", "float32"]
        assert "model.layers.0.self_attn" in finding.message
    assert audit(model, {"input_ids": input_ids}, HF).by_code("IPX102") == []
    assert_unchanged(model, before)


def test_ipx102_findings_for_cos_and_sin_can_be_told_apart(input_ids):
    model = returning_fp32_cos_sin(tiny_llama())

    errors = audit(model, {"input_ids": input_ids}).by_code("IPX102")

    assert errors
    assert len({(f.location, f.tensor, f.message) for f in errors}) == len(errors)


def test_model_level_rotary_returning_fp16_cos_sin_is_not_an_ipx102_error(input_ids):
    model = tiny_llama()

    report = audit(model, {"input_ids": input_ids})

    assert report.by_code("IPX102") == []
    assert loud(report) == []


# IPX103 rms-norm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["model.norm", "model.layers.1.input_layernorm"])
def test_fp32_rms_norm_weight_in_an_fp16_llama_is_an_ipx103_error_with_a_safe_fp16_fix(input_ids, norm):
    model = tiny_llama()
    model.get_submodule(norm).float()

    errors = audit(model, {"input_ids": input_ids}).by_code("IPX103")

    assert len(errors) == 1
    finding = errors[0]
    assert (finding.severity, finding.location, finding.tensor) == ("error", norm, f"{norm}.weight")
    assert finding.op == "xe_addons.rms_norm" and finding.dtypes == ["float16", "float32"]
    assert finding.fix is not None and finding.fix.tensors == (f"{norm}.weight",)
    assert finding.fix.to_dtype == "float16" and finding.fix.safety == "safe"


def test_fp32_rms_norm_weight_in_a_bf16_llama_is_not_an_ipx103_error_as_bf16_skips_the_fused_kernel(input_ids):
    model = tiny_llama(torch.bfloat16)
    model.model.norm.float()

    report = audit(model, {"input_ids": input_ids})

    assert report.by_code("IPX103") == []
    assert [f.tensor for f in report.by_code("DT105")] == ["model.norm.weight"]  # the weight was seen


def test_untouched_fp16_llama_has_no_ipx103(input_ids):
    assert audit(tiny_llama(), {"input_ids": input_ids}).by_code("IPX103") == []


# IPX104 gemma rms-norm --------------------------------------------------------------------------------


def tiny_gemma(dtype: torch.dtype) -> nn.Module:
    return tiny("gemma", dtype, num_key_value_heads=1, head_dim=16)


def test_bf16_gemma_rms_norm_is_an_ipx104_error_as_the_kernel_supports_only_fp16_and_fp32(input_ids):
    model = tiny_gemma(torch.bfloat16)

    report = audit(model, {"input_ids": input_ids})

    errors = report.by_code("IPX104")
    norms = [f"model.layers.{layer}.{kind}" for layer in range(LAYERS)
             for kind in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]
    assert sorted(f.location for f in errors) == sorted(norms)
    for finding in errors:
        assert finding.severity == "error" and finding.op == "xe_addons.rms_norm"
        assert finding.tensor == f"{finding.location}.weight"
        assert "supports only float16, float32" in finding.message and "bfloat16" in finding.message
        assert finding.fix is None
    assert loud(report) == errors
    assert loud(audit(model, {"input_ids": input_ids}, HF)) == []


def test_fp16_gemma_has_no_ipx104(input_ids):
    report = audit(tiny_gemma(torch.float16), {"input_ids": input_ids})

    assert report.by_code("IPX104") == []
    assert loud(report) == []


def test_bf16_llama_rms_norm_is_not_an_ipx104_error_as_ipx104_is_for_gemma(input_ids):
    report = audit(tiny_llama(torch.bfloat16), {"input_ids": input_ids})

    assert [f for f in report.findings if f.category == "kernel-contract"] == []


# IPX105 layer-norm ------------------------------------------------------------------------------------


def test_fp32_layer_norm_weight_in_an_fp16_phi_is_an_ipx105_error(input_ids):
    model = tiny("phi", torch.float16)
    norm = model.model.final_layernorm
    norm.weight = nn.Parameter(norm.weight.detach().float())

    errors = audit(model, {"input_ids": input_ids}).by_code("IPX105")

    assert [f.tensor for f in errors] == ["model.final_layernorm.weight"]  # its bias is still float16
    finding = errors[0]
    assert (finding.severity, finding.location) == ("error", "model.final_layernorm")
    assert finding.op == "xe_addons.layer_norm" and finding.dtypes == ["float16", "float32"]
    assert finding.fix is not None and finding.fix.to_dtype == "float16" and finding.fix.safety == "safe"
    assert audit(model, {"input_ids": input_ids}, HF).by_code("IPX105") == []


def test_untouched_fp16_phi_has_no_ipx105(input_ids):
    report = audit(tiny("phi", torch.float16), {"input_ids": input_ids})

    assert report.by_code("IPX105") == []
    assert loud(report) == []


# IPX106 sdp -------------------------------------------------------------------------------------------


class TinyAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, seq, hidden)


class TinyBlock(nn.Module):
    """fp16 attention whose config declares the head size (hidden / heads)."""

    def __init__(self, hidden: int = 128, heads: int = 2, model_type: str = "llama") -> None:
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=hidden, num_attention_heads=heads, model_type=model_type)
        self.attn = TinyAttention(hidden, heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attn(x, mask)


def tiny_block(heads: int = 2, model_type: str = "llama") -> nn.Module:
    torch.manual_seed(0)
    return TinyBlock(128, heads, model_type).half().eval()


def attention_inputs(mask_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 128, generator=generator).to(torch.float16)
    mask = torch.triu(torch.full((8, 8), -1e4), diagonal=1).expand(1, 1, 8, 8).to(mask_dtype)
    return x, mask


def test_cpu_torch_accepts_an_fp32_mask_with_an_fp16_query():
    query = torch.randn(1, 2, 8, 64).to(torch.float16)
    out = F.scaled_dot_product_attention(query, query, query, attn_mask=torch.zeros(1, 1, 8, 8))
    assert out.dtype == torch.float16  # where ipex-llm's xe_addons.sdp asserts mask dtype == query dtype


def test_ipx106_is_silent_for_a_model_ipex_llm_leaves_on_transformers_attention():
    """ipex-llm replaces the attention of llama, qwen2, ... with its fused SDP; a T5 keeps its own."""
    assert audit(tiny_block(model_type="t5"), attention_inputs(torch.float32)).by_code("IPX106") == []


def test_fp32_mask_into_fp16_attention_with_head_dim_64_is_an_ipx106_error_naming_the_mask():
    model = tiny_block()
    before = snapshot(model)

    report = audit(model, attention_inputs(torch.float32))

    errors = report.by_code("IPX106")
    assert len(errors) == 1
    finding = errors[0]
    assert (finding.severity, finding.location, finding.op) == ("error", "attn", "xe_addons.sdp")
    assert finding.dtypes == ["float16", "float32"]
    assert "the attention mask entering attn (float32)" in finding.message
    assert "the query dtype, float16" in finding.message
    assert report.by_code("DT001") == []  # CPU ran it
    assert_unchanged(model, before)


def test_fp16_mask_into_fp16_attention_is_not_an_ipx106_error():
    report = audit(tiny_block(), attention_inputs(torch.float16))

    assert report.by_code("IPX106") == []
    assert loud(report) == []


def test_fp32_mask_is_not_an_ipx106_error_where_head_dim_32_keeps_the_fused_sdp_off():
    model = tiny_block(heads=4)  # head_dim 128 / 4 = 32, not a size xe_addons.sdp takes

    assert audit(model, attention_inputs(torch.float32)).by_code("IPX106") == []


def test_fp32_mask_into_fp16_attention_is_no_error_under_hf_eager_where_torch_accepts_it():
    report = audit(tiny_block(), attention_inputs(torch.float32), HF)

    assert [f for f in report.findings if f.severity == "error"] == []


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fp16_llama_with_head_dim_64_gives_the_fused_sdp_one_dtype(input_ids, attention):
    model = tiny_llama(hidden_size=128, num_attention_heads=2, attn_implementation=attention)
    inputs = {"input_ids": input_ids, "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])}

    report = audit(model, inputs)

    assert report.by_code("IPX106") == []
    assert loud(report) == []


# IPX107 qwen2 mlp -------------------------------------------------------------------------------------


class ToFloat32(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def test_qwen2_mlp_whose_up_proj_returns_fp32_is_an_ipx107_error(input_ids):
    model = tiny("qwen2", torch.float16, num_key_value_heads=2)
    mlp = model.model.layers[0].mlp
    mlp.up_proj = nn.Sequential(mlp.up_proj, ToFloat32())

    errors = audit(model, {"input_ids": input_ids}).by_code("IPX107")

    assert len(errors) == 1
    finding = errors[0]
    assert (finding.severity, finding.location) == ("error", "model.layers.0.mlp")
    assert finding.op == "xe_addons.mlp_silu_mul_inplaced" and finding.dtypes == ["float16", "float32"]
    assert "to match output of model.layers.0.mlp.up_proj, float32" in finding.message
    assert "output of model.layers.0.mlp.gate_proj (float16)" in finding.message
    assert audit(model, {"input_ids": input_ids}, HF).by_code("IPX107") == []


def test_untouched_fp16_qwen2_has_no_ipx107(input_ids):
    report = audit(tiny("qwen2", torch.float16, num_key_value_heads=2), {"input_ids": input_ids})

    assert report.by_code("IPX107") == []
    assert loud(report) == []


# IPX108 LowBitLinear ----------------------------------------------------------------------------------


class LowBitLinear(nn.Module):
    """Stands in for ipex_llm's LowBitLinear: the contract matches the class name."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight


class QuantisedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = LowBitLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_uint8_input_to_low_bit_linear_is_an_ipx108_error():
    model = QuantisedNet().eval()
    before = snapshot(model)

    report = audit(model, torch.randint(0, 255, (2, 16), dtype=torch.uint8))

    errors = report.by_code("IPX108")
    assert len(errors) == 1
    finding = errors[0]
    assert (finding.severity, finding.location, finding.op) == ("error", "proj", "xe_linear.forward_new")
    assert "supports only float16, float32, bfloat16" in finding.message and "uint8" in finding.message
    assert finding.dtypes == ["uint8"] and finding.fix is None
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_floating_input_to_low_bit_linear_is_not_an_ipx108_error(dtype):
    report = audit(QuantisedNet().eval(), torch.randn(2, 16).to(dtype))

    assert report.by_code("IPX108") == []
