"""The precision advisor on real transformers classes with planted magnitudes: the plan names modules
inside the planted block only, an independent implementation of the island semantics confirms its error,
a clean model needs nothing in at most 3 forwards, and a residual stream past float16's range gets
bfloat16, verified."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from helpers import assert_unchanged, snapshot

import dtypelint
from dtypelint.advisor import PrecisionPlan, keep_in_float32, precision
from dtypelint.cli import main
from dtypelint.errors import UsageError

SCALE = 3e5  # an MLP's first projection times this, its last one divided: float32 outputs unchanged


def _llama(layers: int = 4) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return transformers.LlamaForCausalLM(config).eval()


def _tokens(length: int = 16) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1))}


def _plant(first: torch.nn.Linear, last: torch.nn.Linear, scale: float = SCALE) -> None:
    """Activations past float16's range between ``first`` and ``last`` (as trained models have in their MLPs)."""
    with torch.no_grad():
        first.weight.mul_(scale)
        last.weight.div_(scale)


def planted_llama() -> tuple[torch.nn.Module, dict, str]:
    model = _llama()
    _plant(model.model.layers[2].mlp.up_proj, model.model.layers[2].mlp.down_proj)
    return model, _tokens(), "model.layers.2"


def planted_bert() -> tuple[torch.nn.Module, dict, str]:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                     num_attention_heads=4, vocab_size=256)
    model = transformers.BertModel(config).eval()
    layer = next(name for name, module in model.named_modules() if name.endswith(".1") and "layer" in name)
    _plant_mlp(model, layer, config.intermediate_size)
    return model, _tokens(), layer


def _plant_mlp(model: torch.nn.Module, layer: str, intermediate: int) -> None:
    """Plant in the MLP of the layer named ``layer``, found by its shapes (transformers 5 renamed ViT's)."""
    linears = [module for module in model.get_submodule(layer).modules() if isinstance(module, torch.nn.Linear)]
    first = next(linear for linear in linears if linear.out_features == intermediate)
    last = next(linear for linear in linears if linear.in_features == intermediate)
    _plant(first, last)


def planted_vit() -> tuple[torch.nn.Module, dict, str]:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                    num_attention_heads=4, image_size=32, patch_size=8, num_labels=10)
    model = transformers.ViTForImageClassification(config).eval()
    layer = next(name for name, module in model.named_modules() if name.endswith(".2") and "layer" in name)
    _plant_mlp(model, layer, config.intermediate_size)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, {"pixel_values": pixels}, layer


def planted_t5() -> tuple[torch.nn.Module, dict, str]:
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=256)
    model = transformers.T5ForConditionalGeneration(config).eval()
    block = model.decoder.block[1].layer[2].DenseReluDense
    _plant(block.wi, block.wo)
    inputs = {**_tokens(), "decoder_input_ids": _tokens(8)["input_ids"]}
    return model, inputs, "decoder.block.1.layer.2"


# The test's own island semantics, written without dtypelint's code: the model in the low dtype as a
# checkpoint loaded in it is (non-persistent buffers as built), kept modules with float32 parameters,
# floating inputs cast to float32, floating outputs cast back to the low dtype.
def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _cast(item, dtype) for key, item in value.items()}
    return value


def _main_output(output) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return output[0]


def island_error(model: torch.nn.Module, inputs: dict, keep: list[str], dtype: torch.dtype) -> float:
    with torch.no_grad():
        reference = _main_output(model(**inputs)).float()
        low = copy.deepcopy(model).to(dtype)
        for name, module in low.named_modules():  # as from_pretrained(dtype=...) leaves them: not cast
            for buffer in module._non_persistent_buffers_set:
                module._buffers[buffer] = model.get_submodule(name)._buffers[buffer].clone()
        for name in keep:
            island = low.get_submodule(name).float()
            island.load_state_dict(model.get_submodule(name).state_dict())  # float32 weights, not a half round trip
            island.register_forward_pre_hook(lambda _, args, kwargs: (_cast(args, torch.float32),
                                                                      _cast(kwargs, torch.float32)), with_kwargs=True)
            island.register_forward_hook(lambda _, args, output: _cast(output, dtype))
        output = _main_output(low(**_cast(inputs, dtype))).float()
    if not torch.isfinite(output).all():
        return float("inf")
    return float((output - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("build", [planted_llama, planted_bert, planted_vit, planted_t5],
                         ids=["causal-lm", "encoder", "vision", "seq2seq"])
def test_the_plan_keeps_modules_inside_the_planted_block_only(build):
    model, inputs, planted = build()
    before = snapshot(model)
    plan = precision(model, inputs, torch.float16)
    assert_unchanged(model, before)
    assert plan.error["all"] == float("inf") and plan.recommend == "float16"
    assert plan.keep and all(name == planted or name.startswith(f"{planted}.") for name in plan.keep), plan.keep
    assert plan.error["plan"] <= plan.tolerance
    assert island_error(model, inputs, plan.keep, torch.float16) == pytest.approx(plan.error["plan"], rel=1e-3, abs=1e-6)
    assert any(row.get("module", "").startswith(planted) for row in plan.forecast)
    entered = [row["module"] for row in plan.modules if row["enters"]]
    assert len(entered) == 1 and (planted.startswith(entered[0]) or entered[0].startswith(planted))


def test_the_plan_goes_down_to_the_module_that_needs_float32():
    model, inputs, _ = planted_t5()
    assert precision(model, inputs, torch.float16).keep == ["decoder.block.1.layer.2.DenseReluDense"]
    model, inputs, _ = planted_llama()
    assert precision(model, inputs, torch.float16).keep == ["model.layers.2.mlp"]


def test_keeping_less_than_the_plan_fails_and_the_plan_is_minimal():
    model, inputs, _ = planted_llama()
    plan = precision(model, inputs, torch.float16)
    inner = ["model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]  # the mlp's linears as separate islands
    assert island_error(model, inputs, inner, torch.float16) > plan.tolerance
    assert island_error(model, inputs, [], torch.float16) == float("inf")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_clean_model_keeps_nothing_in_at_most_three_forwards(dtype):
    model = _llama()
    plan = precision(model, _tokens(), dtype)
    assert plan.fine_as_is and plan.keep == [] and plan.forwards <= 3
    assert plan.error["all"] <= plan.tolerance and plan.forecast == []
    assert island_error(model, _tokens(), [], dtype) == pytest.approx(plan.error["all"], rel=1e-3, abs=1e-6)


def test_a_residual_stream_past_float16_gets_bfloat16_verified():
    model = _llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e7)  # the stream between every block is past 65504
    plan = precision(model, _tokens(), torch.float16)
    assert plan.keep == [] and plan.recommend == "bfloat16" and plan.error["plan"] is None
    assert plan.error["bfloat16"] <= plan.tolerance
    assert island_error(model, _tokens(), [], torch.bfloat16) == pytest.approx(plan.error["bfloat16"], rel=1e-3)
    assert any("bfloat16 works, verified" in note for note in plan.notes)
    assert not plan.fine_as_is


def test_max_keep_bounds_the_plan_and_recommends_the_dtype_that_works():
    model = _llama()
    for layer in (0, 3):
        _plant(model.model.layers[layer].mlp.up_proj, model.model.layers[layer].mlp.down_proj)
    assert precision(model, _tokens(), torch.float16).keep == ["model.layers.0.mlp", "model.layers.3.mlp"]
    bounded = precision(model, _tokens(), torch.float16, max_keep=1)
    assert bounded.keep == [] and bounded.recommend == "bfloat16"
    assert any("past max_keep=1" in note for note in bounded.notes)


def test_forwards_grow_with_the_logarithm_of_the_depth():
    counts = {}
    for layers in (2, 16):
        model = _llama(layers)
        _plant(model.model.layers[layers // 2].mlp.up_proj, model.model.layers[layers // 2].mlp.down_proj)
        plan = precision(model, _tokens(), torch.float16)
        assert plan.keep == [f"model.layers.{layers // 2}.mlp"]
        counts[layers] = plan.forwards
    assert counts[16] - counts[2] <= 6, counts  # 8x the depth: 3 more bisection steps, not 14 more forwards


def test_keep_in_float32_runs_the_plan_and_puts_the_model_back():
    model, inputs, _ = planted_llama()
    plan = precision(model, inputs, torch.float16)
    low = copy.deepcopy(model).half()
    before = snapshot(low)
    with torch.no_grad(), keep_in_float32(low, plan):
        assert low.model.layers[2].mlp.up_proj.weight.dtype == torch.float32
        logits = low(**inputs).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    assert_unchanged(low, before)


def test_apply_plan_reads_a_written_precision_plan(tmp_path):
    model, inputs, _ = planted_llama()
    plan = precision(model, inputs, torch.float16)
    written = plan.write(tmp_path / "plan.json")
    data = json.loads(written.read_text())
    assert data["error"]["all"] == "inf" and data["keep"] == plan.keep
    assert PrecisionPlan.read(written).keep == plan.keep
    target = copy.deepcopy(model)
    before = snapshot(target)
    handle = dtypelint.apply_plan(target, written)
    assert target.lm_head.weight.dtype == torch.float16
    assert target.model.layers[2].mlp.down_proj.weight.dtype == torch.float32
    with torch.no_grad():  # the islands' weights are the float32 ones, not a float16 round trip
        logits, expected = target(**inputs).logits.float(), model(**inputs).logits
    assert float((logits - expected).abs().max() / expected.abs().max()) == pytest.approx(plan.error["plan"], rel=1e-3)
    handle.remove()
    assert_unchanged(target, before)


def test_to_dict_has_the_documented_keys():
    model, inputs, _ = planted_llama()
    data = precision(model, inputs, torch.float16).to_dict()
    assert {"dtype", "recommend", "keep", "forwards", "error", "tolerance", "forecast", "modules"} <= set(data)
    assert set(data["error"]) >= {"all", "plan"} and data["keep_in_fp32_modules"] == ["mlp"]


@pytest.mark.parametrize("arguments, message", [
    ({"dtype": torch.float32}, "float16 or bfloat16"),
    ({"reference": torch.float16}, "float32 or float64"),
    ({"tolerance": -1.0}, "positive number"),
    ({"max_keep": 0}, "positive integer"),
])
def test_bad_arguments_are_usage_errors(arguments, message):
    with pytest.raises(UsageError, match=message):
        precision(_llama(2), _tokens(), **{"dtype": torch.float16, **arguments})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    _llama().save_pretrained(root / "clean")
    planted_llama()[0].save_pretrained(root / "planted")
    return root


def test_cli_exit_codes_and_json(checkpoints, capsys, tmp_path):
    assert main(["precision", str(checkpoints / "clean"), "-q"]) == 0
    assert "float16 is fine as is" in capsys.readouterr().out
    plan_file = tmp_path / "plan.json"
    assert main(["precision", str(checkpoints / "planted"), "-q", "--format", "json",
                 "--write-plan", str(plan_file)]) == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["keep"] == ["model.layers.2.mlp"] and data["error"]["all"] == "inf"
    assert f"dtypelint: wrote the precision plan to {plan_file}" in captured.err.splitlines()
    assert json.loads(plan_file.read_text())["keep"] == data["keep"]
    assert main(["precision", str(checkpoints / "planted"), "-q", "--dtype", "float32"]) == 2
    assert "float16 or bfloat16" in capsys.readouterr().err


def test_cli_text_shows_forecast_table_plan_and_how_to_apply(checkpoints, capsys):
    assert main(["precision", str(checkpoints / "planted"), "-q"]) == 1
    out = capsys.readouterr().out
    for part in ("forecast from the float32 run", "model.layers.2.mlp.up_proj", "where the error enters",
                 "<- past the tolerance", "keep 1 module in float32", "verified", "keep_in_float32",
                 "_keep_in_fp32_modules = ['mlp']"):
        assert part in out, part


@pytest.mark.parametrize("format", ["markdown", "html"])
def test_cli_markdown_and_html(checkpoints, capsys, format):
    assert main(["precision", str(checkpoints / "planted"), "-q", "--format", format]) == 1
    out = capsys.readouterr().out
    assert "model.layers.2.mlp" in out and ("<table" in out if format == "html" else "| module |" in out)


def test_cli_tolerance_from_pyproject(checkpoints, capsys, tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("[tool.dtypelint]\nprecision-tolerance = 1e-9\n")
    assert main(["precision", str(checkpoints / "clean"), "-q", "--config", str(pyproject), "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["tolerance"] == 1e-9
    pyproject.write_text("[tool.dtypelint]\nprecision-tolerance = -1\n")
    assert main(["precision", str(checkpoints / "clean"), "-q", "--config", str(pyproject)]) == 2
    assert "precision-tolerance" in capsys.readouterr().err


def test_cli_refuses_a_plan_inside_the_checkpoint_and_a_config_without_weights(checkpoints, capsys, tmp_path):
    assert main(["precision", str(checkpoints / "planted"), "-q", "--write-plan",
                 str(checkpoints / "planted" / "plan.json")]) == 2
    assert not (checkpoints / "planted" / "plan.json").exists()
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((checkpoints / "clean" / "config.json").read_text())
    assert main(["precision", str(config_only), "-q"]) == 2
    assert "holds no weights" in capsys.readouterr().err


def test_check_unsafe_fix_runs_the_plan_as_islands_and_saves_it(checkpoints, capsys, tmp_path):
    saved = tmp_path / "fixed"
    assert main(["check", str(checkpoints / "planted"), "--dtype", "float16", "-q", "--format", "json"]) == 1
    before = json.loads(capsys.readouterr().out)
    assert [finding["code"] for finding in before["findings"]] == ["DT103"]
    assert before["findings"][0]["fix"]["safety"] == "unsafe"
    assert main(["check", str(checkpoints / "planted"), "--dtype", "float16", "-q", "--format", "json", "--fix",
                 "--unsafe-fixes", "--save-fixed", str(saved)]) == 0
    fixed = json.loads(capsys.readouterr().out)["fix"]
    assert fixed["applied"] and not fixed["after"]["summary"]["error"]
    assert {change["code"] for change in fixed["changes"]} == {"DT103"}
    assert all(change["tensor"].startswith("model.layers.2.mlp.") for change in fixed["changes"])
    plan = json.loads((saved / "dtypelint-fixes.json").read_text())
    assert plan["islands"] == {"dtype": "float16", "modules": ["model.layers.2.mlp"]}
    # Loaded in float32, the plan makes the rest float16 and the islands float32.
    model = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    dtypelint.apply_plan(model, saved / "dtypelint-fixes.json")
    assert model.lm_head.weight.dtype == torch.float16 and model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.layers[2].mlp.down_proj.weight.dtype == torch.float32
    # check --dtype float16 loaded the weights in float16: the fix is verified against those, in float32.
    reference = planted_llama()[0].half().float()
    with torch.no_grad():
        logits, expected = model(**_tokens()).logits.float(), reference(**_tokens()).logits
    assert float((logits - expected).abs().max() / expected.abs().max()) < 1e-2


def test_without_unsafe_fixes_dt103_searches_nothing(checkpoints):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints / "planted", dtype=torch.float16).eval()
    result = dtypelint.fix(model, inputs=_tokens(), dtype="float16")
    assert result.precision is None and not result.plan.changes
    unsafe = dtypelint.fix(model, inputs=_tokens(), dtype="float16", unsafe=True, dry_run=True)
    assert unsafe.precision.keep == ["model.layers.2.mlp"] and unsafe.plan.islands.modules == unsafe.precision.keep
    assert model.model.layers[2].mlp.up_proj.weight.dtype == torch.float16  # a dry run changes nothing


def test_save_fixed_stores_a_precision_plan_that_apply_plan_reads(tmp_path):
    model, inputs, _ = planted_llama()
    plan = precision(model, inputs, torch.float16)
    saved = dtypelint.save_fixed(model, tmp_path / "saved", plan)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    handle = dtypelint.apply_plan(loaded, saved / "dtypelint-fixes.json")
    assert loaded.model.layers[2].mlp.up_proj.weight.dtype == torch.float32
    assert loaded.model.layers[1].mlp.up_proj.weight.dtype == torch.float16
    handle.remove()
    assert loaded.model.layers[1].mlp.up_proj.weight.dtype == torch.float32


def test_the_public_name_is_the_function_after_any_import():
    import dtypelint.fixes  # noqa: F401 - imports the advisor's module

    assert callable(dtypelint.precision) and dtypelint.precision is precision


def test_a_plan_a_backend_kernel_refuses_is_replaced_by_the_dtype_that_works():
    model = _llama()
    _plant(model.model.layers[2].self_attn.v_proj, model.model.layers[2].self_attn.o_proj)
    assert precision(model, _tokens(), torch.float16, backend="cuda").keep == ["model.layers.2.self_attn"]
    # flash-attn takes float16/bfloat16 only: a float32 attention island crashes it on the GPU.
    flash = precision(model, _tokens(), torch.float16, backend="cuda", attn_implementation="flash_attention_2")
    assert flash.keep == [] and flash.recommend == "bfloat16" and flash.error["bfloat16"] <= 6e-2
    assert any("CUDA102" in note and "model.layers.2.self_attn" in note for note in flash.notes)


def test_cli_entry_and_inputs_dtype(tmp_path, monkeypatch, capsys):
    (tmp_path / "precision_entries.py").write_text(
        "import torch\n"
        "class Block(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)\n"
        "    def forward(self, x):\n"
        "        return x + self.down(torch.relu(self.up(x)))\n"
        "def planted():\n"
        "    torch.manual_seed(0)\n"
        "    model = torch.nn.Sequential(Block(), Block(), torch.nn.Linear(16, 4)).eval()\n"
        "    with torch.no_grad():\n"
        "        model[1].up.weight.mul_(3e5); model[1].up.bias.mul_(3e5); model[1].down.weight.div_(3e5)\n"
        "    return model, torch.randn(2, 16)\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["precision", "--entry", "precision_entries:planted", "-q", "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["keep"] == ["1"]
    assert main(["precision", "--entry", "precision_entries:planted", "-q", "--inputs-dtype", "float32"]) == 2
    assert "--inputs-dtype" in capsys.readouterr().err  # an entry feeds its own inputs, as for check
