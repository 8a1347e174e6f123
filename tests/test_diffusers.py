"""diffusers from the command line, as diffusers runs it: component folders (value, meta, static) fed inputs
made from their forward and config, and pipeline folders run as the pipeline runs, with per-component
dtypes; every model is built locally and tiny."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_unchanged, snapshot

from dtypelint.cli import main

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

UNET = {"block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 16, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8}
VAE = {"block_out_channels": (32, 64), "in_channels": 3, "out_channels": 3, "latent_channels": 4, "norm_num_groups": 8,
       "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2, "sample_size": 32}

COMPONENTS = {
    "UNet2DConditionModel": lambda: diffusers.UNet2DConditionModel(**UNET),
    "UNet2DConditionModel-sdxl": lambda: diffusers.UNet2DConditionModel(
        **UNET, addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
    "UNet2DModel": lambda: diffusers.UNet2DModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=3, out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8),
    "AutoencoderKL": lambda: diffusers.AutoencoderKL(**VAE),
    "ControlNetModel": lambda: diffusers.ControlNetModel(
        block_out_channels=(32, 64), layers_per_block=1, in_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, conditioning_embedding_out_channels=(16, 32)),
    "SD3Transformer2DModel": lambda: diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4),
    "FluxTransformer2DModel": lambda: diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
    "PixArtTransformer2DModel": lambda: diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, norm_num_groups=8),
    "DiTTransformer2DModel": lambda: diffusers.DiTTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, num_embeds_ada_norm=10, norm_num_groups=8),
    "AutoencoderTiny": lambda: diffusers.AutoencoderTiny(
        encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4),
}


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("components")
    for name, build in COMPONENTS.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
    return root


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode", ["value", "meta"])
@pytest.mark.parametrize("name", [name for name in COMPONENTS if name != "AutoencoderTiny"])
def test_a_component_folder_is_built_and_fed_as_diffusers_runs_it(components, capsys, name, mode):
    assert main(["check", str(components / name), "--dtype", "float16", "--mode", mode, "-q", "--format", "json"]) == 0
    report = _json(capsys)
    assert report["model"] == name.split("-")[0] and report["mode"] == mode
    assert not [finding for finding in report["findings"] if finding["severity"] == "error"]
    assert report["inputs"], "the report says which inputs were made"


def test_autoencoder_tiny_forward_crashes_in_float16(components, capsys):
    # Its forward rounds the latents to uint8 and divides by 255.0: the decoder gets float32 (a real defect).
    assert main(["check", str(components / "AutoencoderTiny"), "--dtype", "float16", "-q", "--format", "json"]) == 1
    codes = {finding["code"]: finding for finding in _json(capsys)["findings"] if finding["severity"] == "error"}
    assert {"DT001", "DT101"} <= set(codes) and codes["DT101"]["location"].startswith("decoder.")


def test_inputs_dtype_audits_a_pipeline_that_forgets_the_cast(components, capsys):
    assert main(["check", str(components / "UNet2DModel"), "--dtype", "float16", "--inputs-dtype", "float32", "-q",
                 "--format", "json"]) == 1
    report = _json(capsys)
    assert {"DT001", "DT101"} & {finding["code"] for finding in report["findings"]}
    assert any(made["dtype"] == "float32" for made in report["inputs"])


def test_static_reads_a_component_folder(components, capsys):
    assert main(["check", str(components / "UNet2DModel"), "--static", "-q", "--format", "json"]) == 0
    assert _json(capsys)["model"] == "UNet2DModel"


def test_without_diffusers_a_diffusers_folder_says_what_to_install(components, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert main(["check", str(components / "UNet2DModel"), "-q"]) == 2
    error = capsys.readouterr().err.strip()
    assert "dtypelint[diffusers]" in error and len(error.splitlines()) == 1


def _tiny_tokenizer(directory: Path) -> transformers.CLIPTokenizer:
    """A CLIP tokenizer over a local vocabulary of letters: no hub access."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in map(chr, range(97, 123)):
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
        max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel(**UNET), vae=diffusers.AutoencoderKL(**VAE), text_encoder=text,
        tokenizer=_tiny_tokenizer(root / "vocabulary"), scheduler=diffusers.DDIMScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    return root / "sd"


def _tree(directory: Path) -> dict[str, int]:
    return {str(path.relative_to(directory)): path.stat().st_mtime_ns for path in directory.rglob("*")}


def test_a_pipeline_in_float16_runs_clean_with_its_components_named(pipeline, capsys):
    before = _tree(pipeline)
    assert main(["check", str(pipeline), "--dtype", "float16", "-q", "--format", "json"]) == 0
    report = _json(capsys)
    assert report["model"] == "StableDiffusionPipeline" and report["findings"] == []
    assert any("ran StableDiffusionPipeline(" in note for note in report["notes"])
    assert "components run: text_encoder, unet, vae" in report["notes"]
    assert _tree(pipeline) == before  # nothing written into the pipeline folder


def test_a_float32_text_encoder_in_a_float16_pipeline_is_an_error_in_the_unet(pipeline, capsys):
    assert main(["check", str(pipeline), "--dtype", "text_encoder=float32,default=float16", "-q", "--format",
                 "json"]) == 1
    report = _json(capsys)
    errors = [finding for finding in report["findings"] if finding["severity"] == "error"]
    unet = "; the pipeline calls unet (float16) with sample float32, encoder_hidden_states float32 (the output of text_encoder)"
    # The GPU raises first at the time embedding (the latents are made in the prompt embeddings' dtype); the
    # trace goes on past it, to the cross-attention, where the text encoder's output meets the key projection.
    assert errors[0]["code"] == "DT001" and errors[0]["location"] == "unet.time_embedding.linear_1"
    cross = [error for error in errors if error["location"].endswith(".attn2.to_k")]
    assert cross and all(error["code"] == "DT101" and "float32 from parameter text_encoder." in error["message"]
                         for error in cross)
    # Each error names both sides of the boundary it comes from: the UNet's inputs, then the VAE's.
    assert all(error["message"].endswith(unet) for error in errors if error["location"].startswith("unet."))
    assert {error["location"].split(".")[0] for error in errors} == {"unet", "vae"}
    assert all("the pipeline calls vae" in error["message"] for error in errors if error["location"].startswith("vae."))
    # The boundary: the pipeline made the UNet's inputs in the text encoder's dtype.
    assert any(note.startswith("the pipeline calls unet (float16) with sample float32") and
               "encoder_hidden_states float32 (the output of text_encoder)" in note for note in report["notes"])
    assert any(note.startswith("the trace went on past") for note in report["notes"])
    # The text encoder was asked in float32: its float32 weights are intended, not DT105.
    assert not [finding for finding in report["findings"] if finding["location"].startswith("text_encoder")]


def test_a_components_keep_in_fp32_modules_hold_inside_a_pipeline():
    from dtypelint.model_info import ModelInfo

    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    assert "wo" in t5._keep_in_fp32_modules
    assert "wo" in ModelInfo.of(torch.nn.ModuleDict({"text_encoder_2": t5})).keep_in_fp32_modules


def test_the_audit_leaves_the_components_and_the_scheduler_as_they_were(pipeline):
    import dtypelint
    from dtypelint.diffusion import modules_of, pipeline_call

    pipe = diffusers.DiffusionPipeline.from_pretrained(pipeline, torch_dtype=torch.float16)
    modules = modules_of(pipe)
    before, scheduler = snapshot(modules), dict(pipe.scheduler.__dict__)
    report = dtypelint.audit(modules, pipeline_call(pipe), dtype="float16")
    assert_unchanged(modules, before)
    ran = {report.graph.op(op)["module"].split(".")[0] for op in report.graph.ops()}
    assert {"text_encoder", "unet", "vae"} <= ran  # every op attributed to the component that ran it
    assert pipe.scheduler.num_inference_steps == scheduler["num_inference_steps"]
    assert set(pipe.scheduler.__dict__) == set(scheduler)


def _overflowing_vae() -> torch.nn.Module:
    """A decoder block whose activations pass float16's range, as the SDXL VAE's do."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**VAE).eval()
    conv = vae.decoder.up_blocks[0].resnets[0].conv1
    with torch.no_grad():
        conv.weight.mul_(4e5)
        conv.bias.mul_(4e5)
    return vae


def test_a_vae_decoder_past_float16_gets_dt103_with_its_ways_out():
    import copy

    import dtypelint

    sample = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    report = dtypelint.audit(copy.deepcopy(_overflowing_vae()).half(), {"sample": sample.half()})
    (error,) = report.errors
    assert error.code == "DT103" and error.location == "decoder.up_blocks.0.resnets.0.conv1"
    assert "force_upcast" in error.message and "bfloat16" in error.message


def test_the_precision_advisor_plans_a_component():
    import dtypelint

    sample = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plan = dtypelint.precision(_overflowing_vae(), {"sample": sample}, torch.float16)
    assert plan.output == "image" and plan.error["all"] == float("inf")
    assert plan.keep == ["decoder.up_blocks.0.resnets.0"] and plan.error["plan"] <= plan.tolerance


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 64, "max_position_embeddings": 16, "projection_dim": 16, "bos_token_id": 0,
            "eos_token_id": 1, "pad_token_id": 1}
    tokenizer = _tiny_tokenizer(root / "vocabulary")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=diffusers.AutoencoderKL(**VAE, force_upcast=True),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)),
        text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=diffusers.EulerDiscreteScheduler(),
        unet=diffusers.UNet2DConditionModel(**{**UNET, "cross_attention_dim": 64}, addition_embed_type="text_time",
                                            addition_time_embed_dim=8, projection_class_embeddings_input_dim=64))
    pipe.save_pretrained(root / "sdxl")
    return root / "sdxl"


def test_sdxl_upcasts_its_vae_inside_each_call_and_both_calls_are_clean(sdxl, capsys):
    # force_upcast: the pipeline casts the VAE to float32 for the decode and back, in each call; the trace
    # sees the parameters' new dtype (not the one they had when first recorded) and judges the second call.
    assert main(["check", str(sdxl), "--dtype", "float16", "-q", "--format", "json"]) == 0
    report = _json(capsys)
    assert report["steps"] == 2 and report["findings"] == []
    assert "components run: text_encoder, text_encoder_2, unet, vae" in report["notes"]


@pytest.mark.parametrize("name", ["SD3Transformer2DModel", "FluxTransformer2DModel"])
def test_flash_attention_through_diffusers_dispatcher_is_judged_on_what_the_kernel_gets(components, capsys, name):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend, dict(_AttentionBackendRegistry._backends)
    arguments = ["check", str(components / name), "-q", "--format", "json", "--attn-implementation", "flash_attention_2"]
    assert main([*arguments, "--dtype", "float16"]) == 0
    assert _json(capsys)["backend"] == "hf-eager+cuda"
    assert main([*arguments, "--dtype", "float32"]) == 1  # flash-attn takes float16/bfloat16 only
    errors = [finding for finding in _json(capsys)["findings"] if finding["severity"] == "error"]
    assert errors and {error["code"] for error in errors} == {"CUDA102"}
    assert (_AttentionBackendRegistry._active_backend, dict(_AttentionBackendRegistry._backends)) == before


def test_a_dispatcher_backend_is_judged_by_its_own_registered_checks(components, capsys):
    """sage takes float16/bfloat16 only; xformers takes float32 too: the alarm and the silence, from diffusers'
    own constraints."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend, dict(_AttentionBackendRegistry._backends)
    folder = str(components / "FluxTransformer2DModel")
    arguments = ["check", folder, "-q", "--format", "json", "--attn-implementation"]
    assert main([*arguments, "sage", "--dtype", "float16"]) == 0
    report = _json(capsys)
    assert report["backend"] == "hf-eager+cuda"
    assert any("diffusers' sage backend" in note and "own checks" in note for note in report["notes"])
    assert main([*arguments, "sage", "--dtype", "float32"]) == 1
    errors = [finding for finding in _json(capsys)["findings"] if finding["severity"] == "error"]
    assert {error["code"] for error in errors} == {"CUDA106"} and len(errors) == 2  # the joint and the single block
    assert "must be either bfloat16 or float16" in errors[0]["message"]
    assert main([*arguments, "xformers", "--dtype", "float32"]) == 0
    assert (_AttentionBackendRegistry._active_backend, dict(_AttentionBackendRegistry._backends)) == before


def test_autocasts_float32_query_and_key_reach_sage_beside_a_bfloat16_value(components):
    """diffusers#14104: under CUDA autocast the RMSNorm before q and k runs in float32, v stays bfloat16."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::rms_norm", "AutocastCUDA"):
        pytest.skip("this torch keeps rms_norm off CUDA's float32 list (before 2.12)")
    import dtypelint
    from dtypelint.diffusion import component_inputs

    model = diffusers.FluxTransformer2DModel.from_pretrained(components / "FluxTransformer2DModel",
                                                             torch_dtype=torch.bfloat16).eval()
    inputs = component_inputs(model, batch=1, dtype=torch.bfloat16)
    assert dtypelint.audit(model, inputs, attn_implementation="sage").errors == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        errors = dtypelint.audit(model, inputs, attn_implementation="sage").errors
    assert errors and {error.code for error in errors} == {"CUDA106"}
    assert "(q float32, k float32, v bfloat16" in errors[0].message and "same dtype" in errors[0].message


def test_an_unknown_backend_and_a_dispatcher_backend_on_a_transformers_model_are_one_line_usage_errors(
        components, capsys, tmp_path):
    assert main(["check", str(components / "FluxTransformer2DModel"), "-q", "--attn-implementation", "sage2"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "diffusers' dispatcher knows" in error and "sage" in error
    llama = tmp_path / "llama"
    transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=64).save_pretrained(llama)
    assert main(["check", str(llama), "--mode", "meta", "-q", "--attn-implementation", "sage"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "not a diffusers model" in error


@pytest.mark.parametrize("name", ["DiTTransformer2DModel", "PixArtTransformer2DModel"])
def test_patch_embeds_float32_positions_cast_straight_back_are_infos_alike_in_value_and_meta_mode(
        components, capsys, name):
    """PatchEmbed's non-persistent float32 ``pos_embed`` stays float32 under from_pretrained(torch_dtype=float16)
    and meets the latents in ``(latent + pos_embed).to(latent.dtype)``: intended, in both modes."""
    found = {}
    for mode in ("value", "meta"):
        assert main(["check", str(components / name), "--dtype", "float16", "--mode", mode, "-q",
                     "--format", "json"]) == 0
        found[mode] = sorted((f["code"], f["severity"], f["location"]) for f in _json(capsys)["findings"])
    assert found["value"] == found["meta"]
    assert ("DT102", "info", "pos_embed") in found["value"] and all(severity == "info" for _, severity, _ in found["value"])


# Inputs as diffusers' own code makes them -----------------------------------------------------------------

MORE_COMPONENTS = {
    "HunyuanImageTransformer2DModel": {"num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1,
                                       "num_refiner_layers": 1, "text_embed_dim": 256},
    "MiniMaxMusic3Transformer1DModel": {"condition_dim": 128, "num_layers": 1, "num_attention_heads": 2},
    "UNetSpatioTemporalConditionModel": {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1,
                                         "cross_attention_dim": 32, "num_attention_heads": (2, 2, 2, 2)},
    "CogView4Transformer2DModel": {"num_layers": 1, "num_attention_heads": 2, "text_embed_dim": 32, "sample_size": 32},
    "QwenImageTransformer2DModel": {"num_layers": 1, "num_attention_heads": 2, "joint_attention_dim": 32},
    "AutoencoderKLWan": {"base_dim": 16, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1, "attn_scales": [],
                         "temperal_downsample": [False]},
}


def _made(name: str, *, meta: bool = False) -> tuple[torch.nn.Module, dict]:
    """A tiny model of the class in float16 and the inputs dtypelint makes for it (fake ones on meta)."""
    from dtypelint.diffusion import component_inputs
    from dtypelint.fake import new_fake_mode

    torch.manual_seed(0)
    with torch.device("meta" if meta else "cpu"):
        model = getattr(diffusers, name)(**MORE_COMPONENTS[name]).to(torch.float16).eval()
    if not meta:
        return model, component_inputs(model, batch=1, dtype=torch.float16)
    with new_fake_mode():
        return model, component_inputs(model, batch=1, dtype=torch.float16)


def test_the_timestep_is_read_from_the_pipelines_that_take_the_class():
    from dtypelint.diffusion import pipeline_timestep

    # (floating, divided by 1000): Flux's pipelines pass t / 1000 in the latents' dtype, HunyuanImage's the
    # flow-matching step itself, Stable Diffusion's the DDIM/PNDM integer step.
    assert pipeline_timestep("FluxTransformer2DModel") == (True, True)
    assert pipeline_timestep("HunyuanImageTransformer2DModel") == (True, False)
    assert pipeline_timestep("UNet2DConditionModel") == (False, False)
    assert pipeline_timestep("NoSuchModel") is None


@pytest.mark.parametrize("mode", ["value", "meta"])
def test_a_flow_matching_transformer_that_casts_to_the_timesteps_dtype_is_clean_on_its_pipelines_timestep(mode):
    """HunyuanImage embeds the timestep in the timestep's own dtype: an int64 step (the UNet default) made
    DT101 at its time embedder; its pipeline passes ``t.to(latents.dtype)``."""
    import dtypelint

    model, inputs = _made("HunyuanImageTransformer2DModel", meta=mode == "meta")
    assert inputs["timestep"].dtype == torch.float16
    report = dtypelint.audit(model, inputs, mode=mode, dtype="float16")
    assert not report.errors and not report.by_code("DT001"), report.errors


def test_an_audio_transformer_gets_the_shapes_its_forward_documents():
    """MiniMaxMusic3's forward documents ``hidden_states (batch, in_channels, length)`` and
    ``encoder_hidden_states (batch, length, condition_dim)``: one length for both, a 1D sequence, not image
    latents; its docstring says flow matching, so the timestep is a float."""
    import dtypelint

    model, inputs = _made("MiniMaxMusic3Transformer1DModel")
    config = model.config
    assert inputs["hidden_states"].shape[:2] == (1, config.in_channels) and inputs["hidden_states"].dim() == 3
    assert inputs["encoder_hidden_states"].shape == (1, inputs["hidden_states"].shape[2], config.condition_dim)
    assert inputs["timestep"].is_floating_point()
    before = snapshot(model)
    report = dtypelint.audit(model, inputs, dtype="float16")
    assert not report.errors and not report.by_code("DT001"), report.errors
    assert_unchanged(model, before)


def test_stable_video_diffusions_unet_gets_frames_first_and_its_added_time_ids():
    """Its forward reads ``batch_size, num_frames = sample.shape[:2]``; the AlphaBlender's float32
    ``torch.ones`` is reshaped and cast back to the stream's dtype: an intended step, not a warning."""
    import dtypelint

    model, inputs = _made("UNetSpatioTemporalConditionModel")
    assert inputs["sample"].shape[1:3] == (2, model.config.in_channels)
    assert inputs["added_time_ids"].shape == (1, 3) and inputs["added_time_ids"].dtype == torch.float16
    report = dtypelint.audit(model, inputs, dtype="float16")
    assert report.findings and not report.errors
    mixers = [finding for finding in report.by_code("DT102") if finding.location.endswith("time_mixer")]
    assert mixers and all(finding.severity.value == "info" for finding in mixers)


@pytest.mark.parametrize(("name", "made"), [("CogView4Transformer2DModel", ("original_size", "target_size", "crop_coords")),
                                            ("QwenImageTransformer2DModel", ("img_shapes",))])
def test_size_conditions_and_image_shapes_are_made_as_the_pipelines_make_them(name, made):
    import dtypelint

    model, inputs = _made(name)
    assert set(made) <= set(inputs)
    report = dtypelint.audit(model, inputs, dtype="float16")
    assert not report.errors and not report.by_code("DT001"), report.findings


def test_a_vae_whose_first_convolution_is_3d_gets_a_video():
    """Wan's VAE says nothing of frames in its name or config: its causal Conv3d does."""
    import dtypelint

    model, inputs = _made("AutoencoderKLWan")
    assert inputs["sample"].shape == (1, 3, 2, 32, 32)
    report = dtypelint.audit(model, inputs, dtype="float16")
    assert not report.errors and not report.by_code("DT001"), report.findings


@pytest.mark.parametrize(("name", "dtype"), [("HunyuanVideoTransformer3DModel", torch.float16),
                                             ("LTXVideoTransformer3DModel", torch.bool),
                                             ("Lumina2Transformer2DModel", torch.long)])
def test_the_text_mask_comes_in_the_dtype_the_pipelines_pass_it(name, dtype):
    """HunyuanVideo's pipeline casts the mask to the transformer's dtype, LTX's makes it bool, Lumina2's passes
    the tokenizer's int64 (and sizes its rotary table from the mask's sum, which a float mask breaks)."""
    from dtypelint.diffusion import component_inputs
    from dtypelint.fake import new_fake_mode

    with torch.device("meta"):
        model = getattr(diffusers, name)().to(torch.float16)
    with new_fake_mode():
        inputs = component_inputs(model, batch=1, dtype=torch.float16)
    assert inputs["encoder_attention_mask"].dtype == dtype
    assert inputs["encoder_attention_mask"].shape == inputs["encoder_hidden_states"].shape[:2]


def test_a_causal_video_vae_gets_one_more_frame_than_it_compresses():
    """KVAE's video VAE compresses time by 4: two frames leave its temporal downsampler nothing (DT001 from
    our input, not the model); 1 + 4 frames pass, as its encoder takes 1 + k * 4."""
    import dtypelint
    from dtypelint.diffusion import component_inputs
    from dtypelint.fake import new_fake_mode

    with torch.device("meta"):
        model = diffusers.AutoencoderKLKVAEVideo().to(torch.float16)
    with new_fake_mode():
        inputs = component_inputs(model, batch=1, dtype=torch.float16)
    assert inputs["sample"].shape[2] == 1 + model.config.temporal_compress_times
    report = dtypelint.audit(model, inputs, mode="meta", dtype="float16")
    assert not report.by_code("DT001"), report.findings


AUDIO_AND_ADAPTERS = {
    "AutoencoderOobleck": {"encoder_hidden_size": 16, "downsampling_ratios": [2, 4], "channel_multiples": [1, 2],
                           "decoder_channels": 16, "decoder_input_channels": 8, "audio_channels": 2},
    "T2IAdapter": {"in_channels": 3, "channels": [32, 32], "num_res_blocks": 1, "downscale_factor": 8},
    "ReduxImageEncoder": {"redux_dim": 32, "txt_in_features": 64},
    "CLIPImageProjection": {"hidden_size": 32},
}


@pytest.mark.parametrize(("name", "argument"), [("AutoencoderOobleck", "sample"), ("T2IAdapter", "x"),
                                                ("ReduxImageEncoder", "x"), ("CLIPImageProjection", "x")])
def test_waveforms_adapter_images_and_projected_tokens_are_made_from_the_models_first_layer(name, argument):
    """Oobleck's config names a sampling rate: its sample is a stereo waveform of two latent frames
    (2 x 4 samples each). T2I-Adapter's image side is a multiple of its pixel-unshuffle (8) times its two stages'
    downsampling (2): 32. Redux and the CLIP image projection start with a linear layer, so they take a few
    tokens of its width. Snake's ``sin(alpha * x)`` on the waveform is an activation, not rotary angles: no
    DT107."""
    import dtypelint
    from dtypelint.diffusion import component_inputs

    torch.manual_seed(0)
    model = getattr(diffusers, name)(**AUDIO_AND_ADAPTERS[name]).to(torch.float16).eval()
    inputs = component_inputs(model, batch=1, dtype=torch.float16)
    expected = {"AutoencoderOobleck": (1, 2, 2 * 2 * 4), "T2IAdapter": (1, 3, 32, 32), "ReduxImageEncoder": (1, 8, 32),
                "CLIPImageProjection": (1, 8, 32)}[name]
    assert inputs[argument].shape == expected
    report = dtypelint.audit(model, inputs, dtype="float16")
    assert not report.by_code("DT001") and not report.by_code("DT107"), report.findings


def test_frames_and_channels_come_from_the_forwards_code_and_its_entry_convolution():
    """I2VGen-XL unpacks ``batch_size, channels, num_frames, height, width = sample.shape``; SVD takes frames
    first. ControlNet-XS's config names no input channels: its ``base_conv_in`` (4), not the control branch's
    first convolution (3), is what the sample enters."""
    from dtypelint.diffusion import _frame_axis, component_inputs
    from dtypelint.fake import new_fake_mode

    assert _frame_axis(diffusers.I2VGenXLUNet.forward) == 2
    assert _frame_axis(diffusers.UNetSpatioTemporalConditionModel.forward) == 1
    with torch.device("meta"):
        model = diffusers.UNetControlNetXSModel().to(torch.float16)
    with new_fake_mode():
        inputs = component_inputs(model, batch=1, dtype=torch.float16)
    assert inputs["sample"].shape[1] == model.base_conv_in.in_channels == 4


def test_a_transformer_that_reads_a_timestep_per_frame_gets_one():
    """AnyFlow's condition embedder unpacks ``batch_size, num_frames = timestep.shape``; its pipeline repeats
    the step along the latents' frames, for ``r_timestep`` too."""
    import dtypelint
    from dtypelint.diffusion import component_inputs
    from dtypelint.fake import new_fake_mode

    with torch.device("meta"):
        model = diffusers.AnyFlowTransformer3DModel().to(torch.float16)
    with new_fake_mode():
        inputs = component_inputs(model, batch=1, dtype=torch.float16)
    frames = inputs["hidden_states"].shape[1]
    assert inputs["timestep"].shape == inputs["r_timestep"].shape == (1, frames)
    report = dtypelint.audit(model, inputs, mode="meta", dtype="float16")
    assert not report.by_code("DT001"), report.findings


def test_a_shape_documented_below_its_argument_and_the_text_lengths_are_read():
    """Ernie-Image documents ``text_bth`` two lines down, with `embed_dims` for the config's ``text_in_dim``;
    ``text_lens`` are the prompts' int64 token counts, as its pipeline pads them."""
    from dtypelint.diffusion import component_inputs

    with torch.device("meta"):
        model = diffusers.ErnieImageTransformer2DModel().to(torch.float16)
    inputs = component_inputs(model, batch=1, dtype=torch.float16)
    assert inputs["text_bth"].shape == (1, 8, model.config.text_in_dim)
    assert inputs["text_lens"].dtype == torch.long and inputs["text_lens"].tolist() == [8]


def test_a_class_whose_forward_returns_nothing_is_named_with_what_to_audit(tmp_path, capsys):
    """A MotionAdapter is weights a UNetMotionModel loads; its forward is ``pass``."""
    root = tmp_path / "adapter"
    diffusers.MotionAdapter(block_out_channels=(32,), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8).save_pretrained(root)
    assert main(["check", str(root), "--dtype", "float16", "-q"]) == 2
    error = capsys.readouterr().err.strip()
    assert "MotionAdapter.forward returns nothing" in error and "UNetMotionModel" in error
    assert len(error.splitlines()) == 1
