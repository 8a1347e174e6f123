"""The bitsandbytes pack (BNB101, BNB102) against the real library: bitsandbytes 0.50.2 runs 4-bit and 8-bit
inference on CPU, loaded as users load it (``from_pretrained(quantization_config=..., device_map="cpu")``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import judged_silently
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

import dtypelint

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")

BNB = "bitsandbytes"
LAYERS = 2
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def load(path: Path, dtype: torch.dtype, **quantization) -> torch.nn.Module:
    config = BitsAndBytesConfig(**quantization)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype, device_map="cpu").eval()



def test_4bit_fp16_model_with_bf16_compute_dtype_warns_on_every_4bit_linear(checkpoint, input_ids):
    model = load(checkpoint, torch.float16, load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)

    report = dtypelint.audit(model, {"input_ids": input_ids}, backend=BNB)

    warnings = report.by_code("BNB101")
    assert len(warnings) == LAYERS * LINEARS_PER_LAYER
    assert {f.severity for f in warnings} == {"warning"} and {f.pack for f in warnings} == {BNB}
    down = next(f for f in warnings if f.location == "model.layers.1.mlp.down_proj")
    assert "bfloat16" in down.message and "float16" in down.message and "bnb_4bit_compute_dtype" in down.message
    assert report.errors == []


def test_4bit_fp16_model_with_fp16_compute_dtype_is_silent(checkpoint, input_ids):
    model = load(checkpoint, torch.float16, load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)
    report = dtypelint.audit(model, {"input_ids": input_ids}, backend=BNB)
    assert [f for f in report.findings if f.severity != "info"] == []


def test_quantized_storage_is_not_a_parameter_off_the_compute_dtype(checkpoint, input_ids):
    four = load(checkpoint, torch.float16, load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)
    eight = load(checkpoint, torch.float16, load_in_8bit=True)
    assert four.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8
    assert eight.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    for model in (four, eight):
        assert judged_silently(dtypelint.audit(model, {"input_ids": input_ids}, backend=BNB), "DT105")


def test_8bit_bf16_activations_warn_and_fp16_ones_do_not(checkpoint, input_ids):
    bf16 = dtypelint.audit(load(checkpoint, torch.bfloat16, load_in_8bit=True), {"input_ids": input_ids}, backend=BNB)
    fp16 = dtypelint.audit(load(checkpoint, torch.float16, load_in_8bit=True), {"input_ids": input_ids}, backend=BNB)

    casts = bf16.by_code("BNB102")
    assert len(casts) == LAYERS * LINEARS_PER_LAYER
    assert all("bfloat16" in f.message and f.severity == "warning" for f in casts)
    assert fp16.by_code("BNB102") == []


def packing(model: torch.nn.Module) -> torch.nn.Module:
    """bitsandbytes' AVX512-BF16 path, forced on: the first forward repacks each 4-bit weight's ``.data`` and
    its ``quant_state`` together (what it does by itself on CPUs with avx512_bf16), and state_dict()
    afterwards unpacks a re-quantized absmax."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    return model


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("repacks", [False, True], ids=["as-loaded", "repacking"])
def test_an_audit_leaves_every_state_entry_as_it_was_quant_state_included(checkpoint, input_ids, repacks):
    model = load(checkpoint, torch.float16, load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = packing(model) if repacks else model
    before = full_state(model)
    dtypelint.audit(model, {"input_ids": input_ids}, backend=BNB)
    after = full_state(model)
    assert after.keys() == before.keys()
    assert [name for name, tensor in before.items() if not torch.equal(after[name], tensor)] == []
    if repacks:  # guards the test: a forward outside dtypelint does change the quant state
        with torch.no_grad():
            model(input_ids)
        assert any(not torch.equal(tensor, before[name]) for name, tensor in full_state(model).items())


def test_an_audit_as_first_forward_leaves_bitsandbytes_own_repacking_alone(checkpoint, input_ids):
    untouched = packing(load(checkpoint, torch.bfloat16, load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16))
    audited = packing(load(checkpoint, torch.bfloat16, load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16))

    dtypelint.audit(audited, {"input_ids": input_ids}, backend=BNB)

    with torch.no_grad():  # restoring only .data under bnb's new quant_state would corrupt every layer
        assert torch.equal(audited(input_ids).logits, untouched(input_ids).logits)


def test_cuda_and_bitsandbytes_together_each_finding_names_its_pack(checkpoint, input_ids):
    """One deployment, one device and one quantization: a float32-loaded 4-bit model with bf16 compute run
    with flash attention (transformers casts a quantized model's float32 query to config.dtype: float32)."""
    model = load(checkpoint, torch.float32, load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)

    report = dtypelint.audit(model, {"input_ids": input_ids}, backend=["cuda", BNB],
                             attn_implementation="flash_attention_2")

    assert report.backend == "cuda+bitsandbytes"
    packs = {(f.code, f.pack) for f in report.findings if f.severity != "info"}
    assert ("BNB101", BNB) in packs and ("CUDA102", "cuda") in packs
    assert {f.pack for f in report.findings if f.code.startswith("DT")} <= {None}
