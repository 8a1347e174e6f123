"""IPX101 against real transformers 4.37 models and the real ipex-llm load_low_bit flow."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import dtypelint

FAMILIES = {
    "llama": ({"num_key_value_heads": 2}, "model.layers.{}.self_attn.rotary_emb.inv_freq"),
    "mistral": ({"num_key_value_heads": 2}, "model.layers.{}.self_attn.rotary_emb.inv_freq"),
    "qwen2": ({"num_key_value_heads": 2}, "model.layers.{}.self_attn.rotary_emb.inv_freq"),
    "phi": ({}, "model.layers.{}.self_attn.rotary_emb.inv_freq"),
    "gpt_neox": ({}, "gpt_neox.layers.{}.attention.rotary_emb.inv_freq"),
}
LAYERS = 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random checkpoint of each family, saved as transformers 4.37 saves it."""
    paths = {}
    for family, (extra, _) in FAMILIES.items():
        config = AutoConfig.for_model(
            family, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
            vocab_size=256, max_position_embeddings=256, **extra,
        )
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(family)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        paths[family] = path
    return paths


def load(path, dtype):
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()


def audit(model, backend):
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    return dtypelint.audit(model, {"input_ids": ids}, backend=backend)


def loud(report):
    return [f for f in report.findings if f.severity in ("error", "warning")]


def loud_but_rope_precision(report):
    """Issue #12, mechanism 4: transformers 4.37 casts inv_freq with the model (issue #25681); DT107 says so."""
    return [f for f in loud(report) if f.code != "DT107"]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_load_breaks_the_rotary_kernel_contract(checkpoints, family):
    model = load(checkpoints[family], torch.float16)
    report = audit(model, "ipex-llm-xpu")
    errors = [f for f in report.findings if f.category == "kernel-contract"]
    expected = [FAMILIES[family][1].format(layer) for layer in range(LAYERS)]
    assert [f.tensor for f in errors] == expected
    for finding in errors:
        assert (finding.code, finding.severity, finding.op) == ("IPX101", "error", "xe_addons.rotary_half_inplaced")
        assert finding.dtypes == ["float16", "float32"]
        assert finding.fix is not None and finding.fix.tensors == (finding.tensor,)
        assert finding.fix.to_dtype == "float16" and finding.fix.description.startswith("cast to float16")
        assert finding.fix.safety == "unsafe"
    others = [f for f in loud(report) if f not in errors]
    if family == "gpt_neox":
        # Its float32 cos/sin caches promote q/k to float32: real under ipex-llm, where that float32 then
        # reaches the float16 LayerNorm (intended by transformers' own eager code, silent under hf-eager).
        assert {f.code for f in others} == {"DT102", "DT105"}
        assert all("cos_cached" in f.tensor or "sin_cached" in f.tensor for f in others)
    else:
        assert others == [], report


@pytest.mark.parametrize("family", FAMILIES)
def test_after_half_and_under_hf_eager_there_is_nothing_to_report(checkpoints, family):
    model = load(checkpoints[family], torch.float16)
    assert loud_but_rope_precision(audit(model, "hf-eager")) == []
    assert loud(audit(model.half(), "ipex-llm-xpu")) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_reaches_a_kernel_that_takes_only_fp16_and_fp32(checkpoints, family):
    model = load(checkpoints[family], torch.bfloat16)
    errors = audit(model, "ipex-llm-xpu").by_code("IPX101")
    assert len(errors) == LAYERS
    for finding in errors:
        assert "supports only float16, float32" in finding.message and "bfloat16" in finding.message
        assert finding.fix is None
    assert loud_but_rope_precision(audit(model, "hf-eager")) == []


@pytest.fixture(scope="module")
def low_bit_dir(checkpoints, tmp_path_factory):
    from ipex_llm.transformers import AutoModelForCausalLM as IpexModel

    model = IpexModel.from_pretrained(str(checkpoints["llama"]), load_in_4bit=True)
    path = tmp_path_factory.mktemp("llama-low-bit")
    model.save_low_bit(str(path))
    return path


def load_low_bit(path, dtype):
    from ipex_llm.transformers import AutoModelForCausalLM as IpexModel

    return IpexModel.load_low_bit(str(path), torch_dtype=dtype).eval()


def test_real_load_low_bit_fp16_is_the_seed_failure(low_bit_dir):
    model = load_low_bit(low_bit_dir, torch.float16)
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "LowBitLinear"
    report = audit(model, "ipex-llm-xpu")
    errors = [f for f in report.findings if f.severity == "error"]
    assert [(f.code, f.tensor) for f in errors] == [
        ("IPX101", f"model.layers.{layer}.self_attn.rotary_emb.inv_freq") for layer in range(LAYERS)
    ]
    assert loud(report) == errors
    assert loud_but_rope_precision(audit(model, "hf-eager")) == []
    assert loud(audit(model.half(), "ipex-llm-xpu")) == []


def test_real_load_low_bit_bf16_reports_the_unsupported_dtype(low_bit_dir):
    model = load_low_bit(low_bit_dir, torch.bfloat16)
    errors = [f for f in audit(model, "ipex-llm-xpu").findings if f.severity == "error"]
    assert [f.code for f in errors] == ["IPX101"] * LAYERS
    assert all("bfloat16" in f.message and "supports only" in f.message for f in errors)


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_mode_from_the_config_alone_finds_the_same_contract(checkpoints, family):
    report = dtypelint.audit_config(checkpoints[family], dtype="float16", backend="ipex-llm-xpu")
    errors = [f for f in report.findings if f.category == "kernel-contract"]
    assert [f.tensor for f in errors] == [FAMILIES[family][1].format(layer) for layer in range(LAYERS)]
    assert report.mode == "meta"
