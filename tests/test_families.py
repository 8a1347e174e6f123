"""Every model family from the command line (issue #16): the class the checkpoint records, inputs per
modality, and the classic dtype failures of encoder-decoders, speech and vision models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dtypelint.cli import main

TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "vocab_size": 64}


def tiny_models() -> dict[str, torch.nn.Module]:
    """One tiny model per family, as ``save_pretrained`` would record them."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        CLIPConfig,
        CLIPModel,
        T5Config,
        T5ForConditionalGeneration,
        ViTConfig,
        ViTForImageClassification,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    t5 = T5Config(d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2, vocab_size=64, decoder_start_token_id=0,
                  pad_token_id=0)
    whisper = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                            max_source_positions=16, max_target_positions=32, vocab_size=64,
                            decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            suppress_tokens=None, begin_suppress_tokens=None)
    vision = {**TINY_TEXT, "image_size": 32, "patch_size": 8}
    del vision["vocab_size"]
    clip = CLIPConfig(text_config={**TINY_TEXT, "max_position_embeddings": 32}, vision_config=vision,
                      projection_dim=16)
    torch.manual_seed(0)
    return {
        "t5": T5ForConditionalGeneration(t5),
        "whisper": WhisperForConditionalGeneration(whisper),
        "vit": ViTForImageClassification(ViTConfig(**vision, num_labels=3)),
        "bert": BertForMaskedLM(BertConfig(**TINY_TEXT, max_position_embeddings=64)),
        "clip": CLIPModel(clip),
    }


def overflowing_t5(model: torch.nn.Module) -> torch.nn.Module:
    """The first encoder FFN's input projection scaled until its float16 output overflows to inf: the inf
    turns to NaN in the float32 ``wo`` (transformers keeps ``wo`` in float32 when it loads T5 in float16)
    and reaches the output, past T5's float16 clamps."""
    with torch.no_grad():
        model.encoder.block[0].layer[-1].DenseReluDense.wi.weight.mul_(50000)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for name, model in tiny_models().items():
        model.save_pretrained(root / name)
        paths[name] = root / name
    overflowing_t5(tiny_models()["t5"]).save_pretrained(root / "t5-overflow")
    paths["t5-overflow"] = root / "t5-overflow"
    return paths


def check_json(capsys, *arguments: str) -> tuple[int, dict]:
    code = main(["check", *arguments, "--format", "json", "-q"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out else {}


MADE_INPUTS = {
    "t5": {"input_ids": "int64", "attention_mask": "int64", "decoder_input_ids": "int64"},
    "whisper": {"input_features": "float16", "decoder_input_ids": "int64"},
    "vit": {"pixel_values": "float16"},
    "bert": {"input_ids": "int64", "attention_mask": "int64", "position_ids": "int64"},
}


@pytest.mark.parametrize("mode", ["value", "meta"])
@pytest.mark.parametrize("family", list(MADE_INPUTS))
def test_each_family_is_audited_as_the_class_its_checkpoint_records(family, mode, checkpoints, capsys):
    code, report = check_json(capsys, str(checkpoints[family]), "--dtype", "float16", "--mode", mode)
    recorded = json.loads((checkpoints[family] / "config.json").read_text())["architectures"][0]
    assert code == 0, report["findings"]
    assert report["model"] == recorded and report["model_source"] == "config.architectures"
    assert {made["name"]: made["dtype"] for made in report["inputs"]} == MADE_INPUTS[family]
    assert report["mode"] == mode


def test_the_text_report_says_what_was_built_and_fed(checkpoints, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["check", str(checkpoints["whisper"]), "--dtype", "float16", "-q"]) == 0
    out = capsys.readouterr().out
    assert ("built WhisperForConditionalGeneration (config.architectures) on input_features float16[1, 16, 32], "
            "decoder_input_ids int64[1, 16]") in out.splitlines()


def test_the_status_line_fits_the_terminal_between_names_and_shapes(checkpoints, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["check", str(checkpoints["whisper"]), "--dtype", "float16", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("built "))
    status = lines[start:start + 3]
    assert all(len(line) <= 60 for line in status) and status[1].startswith("  ")
    assert "float16[1, 16, 32]," in " ".join(status) and "int64[1, 16]" in " ".join(status)


def test_a_t5_whose_ffn_overflows_in_float16_gets_the_nonfinite_error(checkpoints, capsys):
    code, report = check_json(capsys, str(checkpoints["t5-overflow"]), "--dtype", "float16")
    nonfinite = [finding for finding in report["findings"] if finding["code"] == "DT103"]
    assert code == 1 and report["model"] == "T5ForConditionalGeneration"
    assert [finding["location"] for finding in nonfinite] == ["encoder.block.0.layer.1.DenseReluDense.wi"]


@pytest.mark.parametrize("mode", ["value", "meta"])
def test_whisper_fed_float32_features_gets_the_mixed_input_error_at_the_first_conv(mode, checkpoints, capsys):
    code, report = check_json(capsys, str(checkpoints["whisper"]), "--dtype", "float16", "--inputs-dtype", "float32",
                              "--mode", mode)
    mixed = [finding for finding in report["findings"] if finding["code"] == "DT101"]
    assert code == 1 and [made["dtype"] for made in report["inputs"]] == ["float32", "int64"]
    assert mixed and mixed[0]["location"] == "model.encoder.conv1" and mixed[0]["tensor"] == "input_features"
    assert sorted(mixed[0]["dtypes"]) == ["float16", "float32"]
    # The caller passes the input, so the error says which cast the caller makes; every error about it does.
    advice = "; cast the input input_features to float16 before the call (input_features.to(torch.float16))"
    about_it = [finding for finding in report["findings"] if finding["tensor"] == "input_features"]
    assert about_it and all(finding["message"].endswith(advice) for finding in about_it)


def test_an_operand_computed_from_weights_gets_no_input_cast_advice(stray_fp32_layer):
    import dtypelint

    report = dtypelint.audit(stray_fp32_layer, torch.randn(3, 16, dtype=torch.float16))
    assert report.errors and not [finding for finding in report.findings if "cast the input" in finding.message]


def test_a_float32_vision_tower_in_a_float16_model_is_one_audit_blamed_on_the_tower(checkpoints):
    """CLIP casts pixel_values to its patch embedding's dtype: a tower kept in float32 runs in float32 and
    hands float32 features to the float16 projection, which raises. The mixed input is traced back into
    the tower, where the cast made it."""
    from dtypelint.config import Settings
    from dtypelint.load import Request, load
    from dtypelint.pipeline import audit_loaded

    loaded = load(Request(path=checkpoints["clip"], dtype=torch.float16))
    loaded.model.vision_model.float()
    report = audit_loaded(loaded, settings=Settings())
    mixed = [finding for finding in report.errors if finding.code == "DT101"]
    assert report.model == "CLIPModel" and len(mixed) == 1
    assert mixed[0].location == "vision_model.embeddings" and "reaches aten.mm in visual_projection" in mixed[0].message
    assert {finding.location.split(".")[0] for finding in report.findings if finding.code == "DT105"} == {"vision_model"}


def test_model_class_overrides_the_recorded_one(checkpoints, capsys):
    code, report = check_json(capsys, str(checkpoints["bert"]), "--model-class", "BertLMHeadModel", "--mode", "meta")
    assert code == 0 and report["model"] == "BertLMHeadModel" and report["model_source"] == "--model-class"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model-class", "NoSuchModel"], "--model-class NoSuchModel, which this transformers does not have"),
        (["--model-class", "T5Model"], "--model-class T5Model, whose config class T5Config does not fit"),
        (["--model-class", "BertConfig"], "not a transformers model class"),
        (["--inputs-dtype", "float13"], "unknown dtype 'float13'"),
    ],
)
def test_a_class_or_dtype_that_cannot_be_used_is_one_line_and_exit_2(arguments, message, checkpoints, capfd):
    assert main(["check", str(checkpoints["bert"]), *arguments, "-q"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_a_recorded_class_this_transformers_lacks_is_exit_2_not_a_substitute(checkpoints, tmp_path, capfd):
    changed = tmp_path / "renamed"
    shutil.copytree(checkpoints["bert"], changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "architectures": ["BertForTimeTravel"]}))
    assert main(["check", str(changed), "-q"]) == 2
    err = capfd.readouterr().err
    assert err == "dtypelint: error: config.architectures names BertForTimeTravel, which this transformers does not have\n"


def test_a_config_without_architectures_takes_the_first_task_mapping_with_a_class(checkpoints, tmp_path, capsys):
    config = json.loads((checkpoints["t5"] / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, report = check_json(capsys, str(tmp_path / "config.json"), "--dtype", "float16")
    assert code == 0 and report["model"] == "T5ForConditionalGeneration"
    assert report["model_source"] == "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"


def test_pixel_values_take_their_size_from_the_preprocessor_config(tmp_path, capsys):
    """ResNet's config has no image size: the image processor saved beside it says 40 x 48."""
    from transformers import ResNetConfig

    ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 40, "width": 48}}))
    code, report = check_json(capsys, str(tmp_path), "--dtype", "float16")
    assert code == 0 and report["mode"] == "meta" and report["model"] == "ResNetForImageClassification"
    assert report["inputs"] == [{"name": "pixel_values", "shape": [1, 3, 40, 48], "dtype": "float16"}]


def test_video_and_raw_audio_inputs_are_shaped_from_the_config(tmp_path, capsys):
    """Video models take (batch, frames, channels, height, width); wav2vec2-like models raw samples, enough
    for their convolutional feature encoder (stride 320 here) to make frames."""
    from transformers import VideoMAEConfig, Wav2Vec2Config

    VideoMAEConfig(**TINY_TEXT, image_size=32, patch_size=8, num_frames=2, tubelet_size=2, num_labels=2,
                   architectures=["VideoMAEForVideoClassification"]).save_pretrained(tmp_path / "video")
    Wav2Vec2Config(**TINY_TEXT, architectures=["Wav2Vec2ForCTC"]).save_pretrained(tmp_path / "audio")
    shapes = {}
    for name in ("video", "audio"):
        code, report = check_json(capsys, str(tmp_path / name), "--dtype", "float16")
        assert code == 0, report["findings"]
        shapes.update({made["name"]: made["shape"] for made in report["inputs"]})
    assert shapes == {"pixel_values": [1, 2, 3, 32, 32], "input_values": [1, 320 * 32 + 10]}


@pytest.mark.parametrize("mode", ["value", "meta"])
def test_remote_code_builds_the_class_its_auto_map_names(mode, tiny_llama_path, tmp_path, capsys):
    checkpoint = tmp_path / "remote"
    shutil.copytree(tiny_llama_path, checkpoint)
    (checkpoint / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\n\nclass CustomLlama(LlamaForCausalLM):\n    pass\n")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(
        {**config, "architectures": ["CustomLlama"], "auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomLlama"}}))
    code, report = check_json(capsys, str(checkpoint), "--trust-remote-code", "--mode", mode)
    assert code == 0 and report["model"] == "CustomLlama" and report["model_source"] == "auto_map"


def test_a_model_whose_constructor_reads_a_value_is_still_audited_from_its_config(capsys):
    """transformers 4's BEiT takes its drop-path rates from ``torch.linspace(...).item()``, which the meta
    device cannot give: meta mode builds it on the CPU, uninitialised, and moves it to the meta device."""
    from transformers import BeitConfig

    from dtypelint import audit_config

    config = BeitConfig(**{key: value for key, value in TINY_TEXT.items() if key != "vocab_size"}, image_size=32,
                        patch_size=8, drop_path_rate=0.1, architectures=["BeitForImageClassification"])
    report = audit_config(config, dtype="float16")
    assert report.model == "BeitForImageClassification" and report.errors == []


def test_a_model_type_transformers_maps_onto_another_familys_class_is_audited(tmp_path, capsys):
    """transformers 5 builds ``exaone`` configs as ``LlamaForCausalLM`` (its Auto mapping says so): the class
    fits although its ``config_class`` is LlamaConfig; a class no mapping gives the config is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get("exaone") != "LlamaForCausalLM":
        pytest.skip("this transformers does not map exaone onto LlamaForCausalLM")
    config = AutoConfig.for_model("exaone", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, eos_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).half().save_pretrained(tmp_path / "exaone")
    capsys.readouterr()
    for mode in ("value", "meta"):
        assert main(["check", str(tmp_path / "exaone"), "--mode", mode]) == 0
        assert "LlamaForCausalLM [" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "exaone"), "--mode", "meta", "--model-class", "BertForMaskedLM"]) == 2
    assert "does not fit the config (ExaoneConfig)" in capsys.readouterr().err
