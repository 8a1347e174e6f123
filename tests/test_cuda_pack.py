"""The cuda pack (CUDA101..CUDA105) on real tiny models, on a CPU machine without flash_attn.

Each contract is shown raising its alarm where the H100 raised (shared/reference/cuda-dtype-facts.md) and
staying silent where it ran.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_LLAMA, assert_unchanged, snapshot
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import dtypelint
from dtypelint.cli import main
from dtypelint.flash_standin import flash_standin, requested_flash
from dtypelint.load import dtype_keyword

CUDA = "cuda"
LAYERS = 2


def codes(report: dtypelint.Report, severity: str = "error") -> list[str]:
    return [finding.code for finding in report.by_severity(severity)]


def tiny_gpt2(dtype: torch.dtype = torch.float16) -> nn.Module:
    config = GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=256, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_llama(dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    config = AutoConfig.for_model("llama", **{**sizes, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, **{dtype_keyword(): dtype}).eval()


# CUDA101 norms ----------------------------------------------------------------------------------------


def test_fp16_gpt2_with_fp32_ln_f_is_a_cuda_error_naming_ln_f_and_nothing_under_hf_eager(input_ids):
    model = tiny_gpt2()
    model.transformer.ln_f.float()
    before = snapshot(model)

    cuda = dtypelint.audit(model, {"input_ids": input_ids}, backend=CUDA)
    eager = dtypelint.audit(model, {"input_ids": input_ids}, backend="hf-eager")

    errors = cuda.errors
    assert {f.code for f in errors} == {"CUDA101"}
    assert {f.location for f in errors} == {"transformer.ln_f"}
    assert {f.tensor for f in errors} == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert all("float32" in f.message and "float16" in f.message for f in errors)
    assert all(f.fix is not None and f.fix.safety == "safe" and f.fix.to_dtype == "float16" for f in errors)
    assert all(f.pack == CUDA for f in errors)
    assert eager.errors == []
    assert_unchanged(model, before)


def test_a_norm_the_model_keeps_in_float32_gets_no_cast_fix_but_the_input_cast_advice(input_ids):
    model = tiny_gpt2()
    model.transformer.ln_f.float()
    model._keep_in_fp32_modules = ["ln_f"]  # the model's own code wants this norm in float32
    errors = dtypelint.audit(model, {"input_ids": input_ids}, backend=CUDA).errors
    assert [f.code for f in errors] == ["CUDA101", "CUDA101"]
    assert all(f.fix is None and "_keep_in_fp32_modules" in f.message and "cast the kernel's float16 input" in f.message
               for f in errors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpt2_in_one_dtype_has_no_norm_error(dtype, input_ids):
    report = dtypelint.audit(tiny_gpt2(dtype), {"input_ids": input_ids}, backend=CUDA)
    assert "CUDA101" not in codes(report)


class GroupNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def test_bf16_group_norm_with_fp32_affine_is_an_error_and_fp32_input_is_not():
    block = GroupNormBlock().bfloat16()
    block.norm.float()
    report = dtypelint.audit(block, torch.randn(2, 8, 16, dtype=torch.bfloat16), backend=CUDA)
    assert [f.location for f in report.errors if f.code == "CUDA101"] == ["norm", "norm"]

    fp32 = dtypelint.audit(GroupNormBlock().float(), torch.randn(2, 8, 16), backend=CUDA)
    assert "CUDA101" not in codes(fp32)  # the contract's gate: only half inputs raise on CUDA


# CUDA102 flash-attention ------------------------------------------------------------------------------


def test_flash_attn_is_not_installed_here():
    assert importlib.util.find_spec("flash_attn") is None  # the audits below need no flash_attn


def flash_audit(model: nn.Module, input_ids: torch.Tensor, implementation: str = "flash_attention_2"):
    with flash_standin(model, implementation):
        return dtypelint.audit(model, {"input_ids": input_ids}, backend=CUDA)


def test_float32_llama_with_flash_attention_2_is_one_error_per_layer(input_ids):
    model = tiny_llama(torch.float32)
    before, config_before = snapshot(model), model.config._attn_implementation

    report = flash_audit(model, input_ids)

    flash = [f for f in report.errors if f.code == "CUDA102"]
    assert [f.location for f in flash] == [f"model.layers.{n}.self_attn" for n in range(LAYERS)]
    assert all("float32" in f.message and "dtype=torch.bfloat16" in f.message for f in flash)
    assert report.graph.graph["error"] is None  # the stand-in ran the attention on CPU
    assert_unchanged(model, before)
    assert model.config._attn_implementation == config_before
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    assert ALL_ATTENTION_FUNCTIONS["flash_attention_2"].__name__ == "flash_attention_forward"


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn"])
def test_bf16_llama_with_flash_attention_has_no_error(implementation, input_ids):
    report = flash_audit(tiny_llama(torch.bfloat16), input_ids, implementation)
    assert report.errors == []
    calls = report.graph.graph["attention_calls"]
    assert len(calls) == 2 * LAYERS  # the prompt and one decode step
    assert {call.implementation for call in calls} == {implementation}


def test_flash_head_dim_above_256_is_an_error(input_ids):
    report = flash_audit(tiny_llama(torch.bfloat16, head_dim=512), input_ids)
    assert [f.code for f in report.errors] == ["CUDA102"] * LAYERS
    assert all("head_dim 512" in f.message for f in report.errors)


def test_without_a_flash_deployment_attention_is_not_a_flash_site(input_ids):
    report = dtypelint.audit(tiny_llama(torch.float32), {"input_ids": input_ids}, backend=CUDA)
    assert "CUDA102" not in codes(report)
    assert {call.implementation for call in report.graph.graph["attention_calls"]} == {"sdpa"}


def test_requested_flash_reads_the_keyword_then_the_config():
    model = tiny_llama()
    assert requested_flash(model) is None
    assert requested_flash(model, "flash_attention_2") == "flash_attention_2"
    model.config._attn_implementation_internal = "flash_attention_3"
    assert requested_flash(model) == "flash_attention_3"


class DirectFlashProcessor(nn.Module):
    """A diffusers-style attention: q/k normed (float32 under autocast), v projected, SDPA called directly."""

    def __init__(self, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_k = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_v = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.norm_q(x)), split(self.norm_k(x)), split(self.to_v(x))
        return F.scaled_dot_product_attention(q, k, v)


def test_direct_sdpa_under_autocast_in_a_flash_deployment_gets_float32_qk_and_is_an_error():
    model, x = DirectFlashProcessor().eval(), torch.randn(1, 8, 64)

    with flash_standin(model, "flash_attention_2"), torch.autocast("cpu", dtype=torch.bfloat16):
        flash = dtypelint.audit(model, x, backend=CUDA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa = dtypelint.audit(model, x, backend=CUDA)

    assert [(f.code, f.dtypes) for f in flash.errors] == [("CUDA102", ["bfloat16", "float32"])]
    assert sdpa.errors == []  # SDPA itself is autocast-aware: it gets bf16 q, k and v


# CUDA103 / CUDA104 SDPA dispatch ----------------------------------------------------------------------


class MaskedAttention(nn.Module):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(head_dim, head_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q(x)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def sdpa_audit(head_dim: int, dtype: torch.dtype, mask: torch.Tensor | None) -> dtypelint.Report:
    model = MaskedAttention(head_dim).to(dtype).eval()
    x = torch.randn(1, 2, 8, head_dim, dtype=dtype)
    return dtypelint.audit(model, (x,) if mask is None else (x, mask), backend=CUDA)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_query_with_fp32_mask_is_an_error_at_head_dim_512_and_not_at_64(dtype):
    mask = torch.zeros(1, 1, 8, 8)
    at_512, at_64 = sdpa_audit(512, dtype, mask), sdpa_audit(64, dtype, mask)

    assert codes(at_512) == ["CUDA103"]
    assert "invalid dtype for bias" in at_512.errors[0].message
    assert at_64.errors == []
    assert codes(at_64, "info") == ["CUDA104"]  # runs, but not on flash: the mask


@pytest.mark.parametrize(
    "mask", [None, torch.ones(1, 1, 8, 8, dtype=torch.bool), torch.zeros(1, 1, 8, 8, dtype=torch.float16)],
    ids=["none", "bool", "query-dtype"],
)
def test_masks_the_efficient_kernel_takes_are_silent_at_head_dim_512(mask):
    assert sdpa_audit(512, torch.float16, mask).errors == []


def test_float32_attention_falls_back_with_an_info_not_an_error():
    report = sdpa_audit(64, torch.float32, torch.zeros(1, 1, 8, 8))
    assert report.errors == [] and codes(report, "info") == ["CUDA104"]
    assert "float16/bfloat16" in report.by_severity("info")[0].message


def test_forcing_flash_makes_the_eligibility_facts_errors():
    model, x = MaskedAttention(64).eval(), torch.randn(1, 2, 8, 64)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        float32 = dtypelint.audit(model, x, backend=CUDA)
        half = dtypelint.audit(model.half(), x.half(), backend=CUDA)
    assert codes(float32) == ["CUDA103"] and "No available kernel" in float32.errors[0].message
    assert half.errors == [] and codes(half, "info") == []


# CUDA105 apex fused norms (recognised by class name: apex is not installed) ---------------------------


def apex_like(name: str) -> type[nn.Module]:
    return type(name, (nn.Module,), {
        "__init__": lambda self: (nn.Module.__init__(self), setattr(self, "weight", nn.Parameter(torch.ones(16))))[0],
        "forward": lambda self, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight.to(x.dtype),
    })


class Residual(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16).half()
        self.norm = norm().half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.proj(x.half()).float())  # a float32 residual stream


def test_float32_residual_into_fp16_fused_rms_norm_is_an_error_but_not_into_mixed_fused():
    x = torch.randn(2, 16)
    fused = dtypelint.audit(Residual(apex_like("FusedRMSNorm")), x, backend=CUDA)
    mixed = dtypelint.audit(Residual(apex_like("MixedFusedRMSNorm")), x, backend=CUDA)
    assert [(f.code, f.location, f.tensor) for f in fused.errors] == [("CUDA105", "norm", "norm.weight")]
    assert "CUDA105" not in codes(mixed)


# Which pack a finding comes from ---------------------------------------------------------------------


def test_findings_name_their_pack_and_generic_ones_none(input_ids):
    model = tiny_gpt2()
    model.transformer.ln_f.float()
    report = dtypelint.audit(model, {"input_ids": input_ids}, backend=CUDA)
    packs = {f.code: f.pack for f in report.findings}
    assert packs["CUDA101"] == CUDA and packs["DT105"] is None
    assert {d["code"]: d["pack"] for d in report.to_dict()["findings"]}["CUDA101"] == CUDA


# Declaring the flash deployment: the keyword, the model's config, audit_config, the CLI ------------------


def test_attn_implementation_keyword_audits_a_flash_deployment(input_ids):
    model = tiny_llama(torch.float32)
    before = snapshot(model)
    report = dtypelint.audit(model, {"input_ids": input_ids}, backend=CUDA, attn_implementation="flash_attention_2")
    assert codes(report) == ["CUDA102"] * LAYERS
    assert any("stand-in for flash_attention_2" in note for note in report.notes)
    assert_unchanged(model, before)
    assert model.config._attn_implementation == "sdpa"


def test_a_config_that_says_flash_attention_2_is_audited_as_flash_without_the_keyword(input_ids):
    model = tiny_llama(torch.float32)
    model.config._attn_implementation_internal = "flash_attention_2"  # as from_pretrained(..., attn_implementation=)
    report = dtypelint.audit(model, {"input_ids": input_ids}, backend=CUDA)
    assert codes(report) == ["CUDA102"] * LAYERS
    assert model.config._attn_implementation == "flash_attention_2"


@pytest.mark.parametrize(("dtype", "expected"), [("float32", ["CUDA102"] * LAYERS), ("bfloat16", [])])
def test_audit_config_with_flash_attention_2(dtype, expected):
    config = tiny_llama().config
    report = dtypelint.audit_config(config, dtype=dtype, backend=CUDA, attn_implementation="flash_attention_2")
    assert codes(report) == expected


@pytest.mark.parametrize(("dtype", "exit_code"), [("float32", 1), ("bfloat16", 0)])
def test_cli_attn_implementation(dtype, exit_code, capsys):
    argv = ["check", str(TINY_LLAMA), "--backend", CUDA, "--attn-implementation", "flash_attention_2", "--dtype",
            dtype, "-q"]
    assert main(argv) == exit_code
    out = capsys.readouterr().out
    assert ("CUDA102" in out) == (exit_code == 1)


def test_cli_rules_lists_one_packs_rules(capsys):
    assert main(["rules", "--backend", CUDA]) == 0
    out = capsys.readouterr().out
    assert "CUDA101" in out and "DT101" in out and "IPX101" not in out and "BNB101" not in out


def test_norm_contract_is_not_checked_under_autocast_which_upcasts_norms_on_cuda(input_ids):
    model = tiny_gpt2()
    model.transformer.ln_f.float()
    with torch.autocast("cpu", dtype=torch.float16):
        report = dtypelint.audit(model, {"input_ids": input_ids}, backend=CUDA)
    assert report.graph.graph["autocast"] == "float16"
    assert "CUDA101" not in codes(report)


def test_a_class_transformers_will_not_run_with_flash_attention_is_refused_with_its_reason(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    from dtypelint.cli import main

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                                vocab_size=64, decoder_start_token_id=0)).half().eval()
    ids = torch.randint(0, 64, (1, 8))
    with pytest.raises(dtypelint.UsageError, match="T5ForConditionalGeneration does not support Flash Attention 2"):
        dtypelint.audit(model, {"input_ids": ids, "decoder_input_ids": ids}, attn_implementation="flash_attention_2")
    model.save_pretrained(tmp_path / "t5")
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["check", str(tmp_path / "t5"), "--attn-implementation", "flash_attention_2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not support Flash Attention 2 yet: transformers refuses" in err


def test_a_flash_attention_flag_brings_the_cuda_contracts_without_backend_cuda(input_ids):
    """The flag names a CUDA deployment: a float32 model under it is an error per layer, not clean."""
    report = dtypelint.audit(tiny_llama(torch.float32), {"input_ids": input_ids}, attn_implementation="flash_attention_2")
    assert report.backend == "hf-eager+cuda"
    assert [f.code for f in report.errors] == ["CUDA102"] * LAYERS
    assert "attn_implementation 'flash_attention_2' brings the cuda pack along" in " ".join(report.notes)
    named = dtypelint.audit(tiny_llama(torch.float32), {"input_ids": input_ids}, backend=CUDA,
                            attn_implementation="flash_attention_2")
    assert named.backend == "cuda" and not any("brings" in note for note in named.notes)
    assert [f.code for f in named.errors] == ["CUDA102"] * LAYERS


def test_a_flash_attention_flag_beside_another_devices_pack_is_one_line(tiny_llama_path, capsys):
    from dtypelint.cli import main

    assert main(["check", str(tiny_llama_path), "--backend", "ipex-llm-xpu",
                 "--attn-implementation", "flash_attention_2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs CUDA kernels; backend ipex-llm-xpu deploys on xpu" in err


def test_packs_of_two_devices_do_not_combine(tiny_llama_path, capsys):
    from dtypelint.cli import main

    assert main(["check", str(tiny_llama_path), "--backend", "cuda,ipex-llm-xpu"]) == 2
    assert "deploy on different devices" in capsys.readouterr().err
