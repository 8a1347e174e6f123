"""The corpus: one entry per public report (its URL in ``url``), the bug as reported and, where the fix is
public, the fixed version as a control. To add a case, add a builder to ``models.py`` (or reuse one) and an
entry here; ``test_corpus.py`` and ``python -m tests.corpus`` pick it up.

``mechanism`` is the number of issue #12's list (0: a conflict the tracer already sees):
1 checks made before any aten op is dispatched, 2 provenance through derived tables, 3 explicit casts that
leak, 4 precision of intended-float32 computations, 5 non-finite values that matter, 6 intended
conventions, 7 autocast. ``known_miss`` says why dtypelint misses the case today: the test is then a strict
xfail, so it turns red the day the mechanism is fixed and the mark is left behind.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import nn
from torch.nn.attention import SDPBackend

from . import models as m


@dataclass(frozen=True)
class Expect:
    """A finding of ``category`` at ``severity`` whose location or tensor contains every one of ``names``."""

    category: str
    names: tuple[str, ...]
    severity: str = "error"


@dataclass(frozen=True)
class Case:
    id: str
    project: str
    url: str
    mechanism: int
    build: Callable[[], tuple[nn.Module, Any]]
    audit: dict = field(default_factory=dict)  # dtypelint.audit keywords: dtype, backend
    expect: Expect | None = None  # the bug: this finding must appear
    control: bool = False  # the fix: no error and no warning at all
    autocast: str | None = None  # audit under torch.autocast("cpu", dtype=autocast)
    needs_pack: str | None = None  # skipped while dtypelint.shipped.available_packs() lacks it
    needs_library: str | None = None  # skipped while this module is not installed (an optional extra)
    known_miss: str | None = None
    fixed_upstream: str | None = None  # why the installed library no longer has the bug: judged as a control

    def __post_init__(self) -> None:
        assert (self.expect is None) == self.control, f"{self.id}: a case is either a bug or a control"
        assert self.known_miss is None or re.match(r"mechanism [1-7]: ", self.known_miss), self.id


def bug(id: str, project: str, url: str, mechanism: int, build: Callable, expect: Expect, **kwargs) -> Case:
    return Case(id, project, url, mechanism, build, expect=expect, **kwargs)


def control(id: str, project: str, url: str, mechanism: int, build: Callable, **kwargs) -> Case:
    return Case(id, project, url, mechanism, build, control=True, **kwargs)


F16 = {"dtype": "float16"}
BF16 = {"dtype": "bfloat16"}

TORCH_FLOAT_MASKS = ("the installed torch accepts a float32 mask with a bfloat16 query on every SDPA kernel but CUDA's "
                     "memory-efficient one; the report's torch refused it everywhere (the cuda pack's CUDA103 "
                     "catches the efficient kernel: comfyui-rope-sdpa-efficient-float-mask)")
COMFY_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

CASES: list[Case] = [
    # 1. Checks made before any aten op is dispatched.
    bug("dia-sdpa-qkv-dtypes", "dia", "https://github.com/nari-labs/dia/issues/158", 1,
        m.sdpa_mixed_qkv, Expect("mixed-input", ("attn",)), audit=F16),
    control("dia-sdpa-qkv-dtypes-fixed", "dia", "https://github.com/nari-labs/dia/pull/45", 1,
            partial(m.sdpa_mixed_qkv, align=True), audit=F16),
    bug("titan-sdpa-float-mask", "TITAN", "https://github.com/mahmoodlab/TITAN/issues/11", 1,
        m.sdpa_float_mask, Expect("mixed-input", ("attn",)), audit=BF16, fixed_upstream=TORCH_FLOAT_MASKS),
    control("titan-sdpa-float-mask-cast", "TITAN", "https://github.com/mahmoodlab/TITAN/issues/11", 1,
            partial(m.sdpa_float_mask, align=True), audit=BF16),
    # ComfyUI's attention enables flash, memory-efficient and math SDPA: a float mask goes to the efficient kernel.
    bug("comfyui-rope-sdpa-efficient-float-mask", "ComfyUI", "https://github.com/BigStationW/ComfyUi-Untwisting-RoPE/issues/26", 1,
        partial(m.sdpa_float_mask, backends=COMFY_BACKENDS), Expect("kernel-contract", ("attn",)), audit=BF16,
        needs_pack="cuda"),
    control("comfyui-rope-sdpa-efficient-mask-cast", "ComfyUI", "https://github.com/BigStationW/ComfyUi-Untwisting-RoPE/issues/26", 1,
            partial(m.sdpa_float_mask, align=True, backends=COMFY_BACKENDS), audit=BF16, needs_pack="cuda"),
    bug("comfyui-conv-float-input", "ComfyUI", "https://github.com/Kosinkadink/ComfyUI-Advanced-ControlNet/issues/105", 1,
        partial(m.conv_input, m.F32, m.F16, m.F16), Expect("mixed-input", ("conv",)), audit=F16),
    control("comfyui-conv-float-input-cast", "ComfyUI", "https://github.com/Kosinkadink/ComfyUI-Advanced-ControlNet/issues/105", 1,
            partial(m.conv_input, m.F32, m.F16, m.F16, align=True), audit=F16),
    bug("mmdet-conv-float-bias", "mmdetection", "https://github.com/open-mmlab/mmdetection/issues/11653", 1,
        partial(m.conv_input, m.F16, m.F16, m.F32), Expect("mixed-input", ("conv.bias",)), audit=F16),
    control("mmdet-conv-float-bias-cast", "mmdetection", "https://github.com/open-mmlab/mmdetection/issues/11653", 1,
            partial(m.conv_input, m.F16, m.F16, m.F32, align=True), audit=F16),
    # 2. Provenance through derived tables.
    bug("vllm-xdrope-cos-sin-cache", "vLLM", "https://github.com/vllm-project/vllm/pull/40180", 2,
        partial(m.cached_rotary, "cos_sin_cache", cast=False), Expect("mixed-input", ("cos_sin_cache",)), audit=F16),
    control("vllm-match-cos-sin-cache-dtype", "vLLM", "https://github.com/vllm-project/vllm/pull/4596", 6,
            partial(m.cached_rotary, "cos_sin_cache", cast=True), audit=F16),
    bug("gptj-embed-positions", "transformers", "https://github.com/huggingface/transformers/pull/34799", 2,
        partial(m.cached_rotary, "embed_positions", cast=False), Expect("mixed-input", ("embed_positions",)), audit=F16),
    control("gptj-embed-positions-cast", "transformers", "https://github.com/huggingface/transformers/pull/34799", 6,
            m.gptj, audit=F16),
    bug("neox-rotary-fp32-in-fp16", "transformers", "https://github.com/huggingface/transformers/pull/24262", 2,
        partial(m.forward_rotary, cast=False), Expect("promotion", ("inv_freq",), "warning"), audit=F16),
    control("neox-rotary-cast-cos-sin", "transformers", "https://github.com/huggingface/transformers/pull/24262", 2,
            partial(m.forward_rotary, cast=True), audit=F16),
    bug("padding-mask-finfo-float32", "transformers", "https://github.com/huggingface/transformers/pull/17306", 2,
        partial(m.padding_mask, m.F32), Expect("promotion", ("attention_mask",), "warning"), audit=F16),
    control("padding-mask-finfo-scores-dtype", "transformers", "https://github.com/huggingface/transformers/pull/17306", 2,
            partial(m.padding_mask, None), audit=F16),
    bug("timm-convit-rel-indices", "timm", "https://github.com/intel/torch-xpu-ops/issues/2599", 2,
        partial(m.relative_positions, cast=False), Expect("mixed-input", ("rel_indices",)), audit=F16),
    # 3. Explicit casts that leak.
    bug("xformers-qk-layernorm-fp32", "xformers", "https://github.com/facebookresearch/xformers/issues/1211", 3,
        partial(m.qk_norm_attention, restore=False), Expect("mixed-input", ("q_norm",)), audit=BF16),
    control("xformers-qk-layernorm-cast-back", "xformers", "https://github.com/facebookresearch/xformers/issues/1211", 3,
            partial(m.qk_norm_attention, restore=True), audit=BF16),
    bug("unianimate-dit-norm1-fp32", "UniAnimate-DiT", "https://github.com/ali-vilab/UniAnimate-DiT/issues/40", 3,
        partial(m.dit_block, restore=False), Expect("mixed-input", ("norm1",)), audit=BF16),
    bug("ipex-llm-native-sdp-softmax-fp32", "ipex-llm", "https://github.com/intel/ipex-llm/pull/10609", 3,
        partial(m.upcast_softmax, cast=False), Expect("mixed-input", ("self_attn",)),
        audit={**BF16, "backend": "ipex-llm-xpu"}),
    control("ipex-llm-native-sdp-cast-probs", "ipex-llm", "https://github.com/intel/ipex-llm/pull/10609", 3,
            partial(m.upcast_softmax, cast=True), audit={**BF16, "backend": "ipex-llm-xpu"}),
    # 4. Precision of intended-float32 computations.
    bug("llama-rotary-inv-freq-bf16", "transformers", "https://github.com/huggingface/transformers/issues/25681", 4,
        partial(m.causal_lm_cast, "Llama", keep_inv_freq_fp32=False), Expect("low-precision-op", ("rotary_emb",), "warning"),
        audit=BF16),
    control("llama-rotary-inv-freq-fp32", "transformers", "https://github.com/huggingface/transformers/pull/29285", 4,
            partial(m.causal_lm_cast, "Llama", keep_inv_freq_fp32=True), audit=BF16),
    bug("mistral-rotary-inv-freq-bf16", "transformers", "https://github.com/huggingface/transformers/issues/29496", 4,
        partial(m.causal_lm_cast, "Mistral", keep_inv_freq_fp32=False), Expect("low-precision-op", ("rotary_emb",), "warning"),
        audit=BF16),
    bug("gpt-neox-rotary-angles-fp16", "gpt-neox", "https://github.com/EleutherAI/gpt-neox/issues/1003", 4,
        partial(m.angle_rotary, m.F16, m.F16), Expect("low-precision-op", ("rotary_emb",), "warning"), audit=F16),
    bug("modalities-inv-freq-to-bf16", "Modalities", "https://github.com/Modalities/modalities/pull/462", 4,
        partial(m.angle_rotary, m.BF16, m.BF16), Expect("low-precision-op", ("rotary_emb",), "warning"), audit=BF16),
    control("modalities-inv-freq-fp32", "Modalities", "https://github.com/Modalities/modalities/pull/462", 4,
            partial(m.angle_rotary, m.F32, m.BF16), audit=BF16),
    # 5. Non-finite values that matter.
    bug("t5-ff-overflow-inf-output", "transformers", "https://github.com/huggingface/transformers/issues/5651", 5,
        partial(m.t5_overflow, blocks=1), Expect("nonfinite", ("wo",)), audit=F16),
    bug("t5-encoder-overflow-nan-output", "openvino", "https://github.com/openvinotoolkit/openvino/pull/37041", 5,
        partial(m.t5_overflow, blocks=2), Expect("nonfinite", ("ffs.0.wo",)), audit=F16),
    control("t5-encoder-fp16-clamp", "transformers", "https://github.com/huggingface/transformers/pull/9487", 5,
            partial(m.t5_encoder, overflow=True, keep_wo_fp32=False), audit=F16),
    control("nemo-mask-where-finfo-min", "NeMo-Automodel", "https://github.com/NVIDIA-NeMo/Automodel/pull/2658", 5,
            partial(m.causal_padding, "where"), audit=BF16),
    control("torchbenchmark-mask-fill-finfo-min", "pytorch-benchmark", "https://github.com/pytorch/benchmark/pull/794", 5,
            partial(m.causal_padding, "masked_fill"), audit=BF16),
    # 6. Intended conventions.
    control("peft-fp32-lora-on-fp16-base", "PEFT", "https://github.com/huggingface/peft/issues/2421", 6,
            partial(m.lora, cast_input=True), audit=F16),
    bug("textgen-lora-fp32-uncast-input", "PEFT", "https://github.com/oobabooga/textgen/issues/2980", 6,
        partial(m.lora, cast_input=False), Expect("mixed-input", ("lora_A",)), audit=F16),
    control("t5-keep-in-fp32-wo", "transformers", "https://github.com/huggingface/transformers/pull/20683", 6,
            partial(m.t5_encoder, overflow=False, keep_wo_fp32=True), audit=F16),
    bug("t5-wo-fp32-without-cast", "transformers", "https://github.com/huggingface/transformers/pull/21281", 6,
        m.t5_wo_fp32_uncast, Expect("mixed-input", ("wo",)), audit=F16),
    # 7. Autocast.
    bug("omnivoice-flex-qk-norm-autocast", "OmniVoice", "https://github.com/k2-fsa/OmniVoice/pull/212", 7,
        m.flex_qk_norm, Expect("promotion", ("q_norm",), "warning"), audit=BF16, autocast="bfloat16"),
    control("pytorch-mha-autocast-float-mask", "pytorch", "https://github.com/pytorch/pytorch/issues/111276", 7,
            m.transformer_encoder_layer, audit={"dtype": "float32"}, autocast="bfloat16"),
    bug("diffusers-xformers-autocast-norm-q", "diffusers", "https://github.com/huggingface/diffusers/issues/6774", 7,
        m.normed_query, Expect("mixed-input", ("norm_q",)), audit=BF16,
        autocast="bfloat16", needs_pack="cuda"),
    bug("physicsnemo-natten-qk-norm-autocast", "physicsnemo", "https://github.com/NVIDIA/physicsnemo/pull/1978", 7,
        partial(m.normed_query, norm_k=True), Expect("mixed-input", ("norm_q",)), audit=BF16,
        autocast="bfloat16", needs_pack="cuda"),
    control("physicsnemo-natten-qk-norm-cast-back", "physicsnemo", "https://github.com/NVIDIA/physicsnemo/pull/1978", 7,
            partial(m.normed_query, norm_k=True, cast_back=True), audit=BF16, autocast="bfloat16", needs_pack="cuda"),
    bug("bnb-linear4bit-fp32-compute", "bitsandbytes", "https://github.com/bitsandbytes-foundation/bitsandbytes/pull/2077", 7,
        partial(m.linear4bit, m.F32), Expect("kernel-contract", ("0",), "warning"), audit=F16, needs_pack="bitsandbytes", needs_library="bitsandbytes"),
    control("bnb-linear4bit-fp16-compute", "bitsandbytes", "https://github.com/h2oai/h2ogpt/pull/682", 7,
            partial(m.linear4bit, m.F16), audit=F16, needs_pack="bitsandbytes", needs_library="bitsandbytes"),
    # Conflicts the tracer already sees.
    bug("deepspeed-fp16-engine-float-input", "DeepSpeed", "https://github.com/deepspeedai/DeepSpeed/issues/550", 0,
        partial(m.half_model_float_input, cast_input=False), Expect("mixed-input", ("0",)), audit=F16),
    control("deepspeed-fp16-input-autocasting", "DeepSpeed", "https://github.com/deepspeedai/DeepSpeed/pull/2158", 0,
            partial(m.half_model_float_input, cast_input=True), audit=F16),
    bug("ipex-llm-rotary-bf16", "ipex-llm", "https://github.com/intel/ipex-llm/issues/12304", 0,
        partial(m.per_layer_rotary_llama, m.BF16), Expect("kernel-contract", ("inv_freq",)),
        audit={**BF16, "backend": "ipex-llm-xpu"}),
    bug("pytorch-layernorm-fp32-weight-cuda", "pytorch", "https://github.com/pytorch/pytorch/issues/135969", 1,
        m.layer_norm_fp32_weight, Expect("kernel-contract", ("1",)), audit=F16, needs_pack="cuda"),
]
