"""Attack table: inputs that once gave a wrong answer without a word (a clean report of random weights,
thirty false warnings from a nan threshold) are refused with exit code 2 and one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dtypelint.cli import main
from dtypelint.errors import UsageError
from dtypelint.rules.base import Options


def _tiny_llama(directory: Path, *, tie_word_embeddings: bool) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                         tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(directory)
    return directory


def _edit_weights(directory: Path, edit) -> None:
    file = directory / "model.safetensors"
    tensors = edit(load_file(file))
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    _tiny_llama(root / "tied", tie_word_embeddings=True)
    for name in ("missing-layer", "unexpected-tensor", "wrong-shape"):
        _tiny_llama(root / name, tie_word_embeddings=False)
    _edit_weights(root / "missing-layer", lambda t: {k: v for k, v in t.items() if ".layers.1." not in k})
    half = torch.float16
    _edit_weights(root / "unexpected-tensor", lambda t: {**t, "model.extra.weight": torch.zeros(4, dtype=half)})
    _edit_weights(root / "wrong-shape", lambda t: {**t, "model.norm.weight": torch.ones(16, dtype=half)})
    return root


CHECKPOINT_ROWS = [
    # (id, checkpoint, exit code, what stderr's one line must say; None: nothing on stderr)
    ("shipped-example-is-clean", "{tiny}", 0, None),
    ("tied-lm-head-is-not-missing", "{root}/tied", 0, None),
    ("missing-layer", "{root}/missing-layer", 2,
     "9 missing tensor(s) against its config: model.layers.1.input_layernorm.weight, "
     "model.layers.1.mlp.down_proj.weight, model.layers.1.mlp.gate_proj.weight, ..."),
    ("unexpected-tensor", "{root}/unexpected-tensor", 2,
     "1 unexpected tensor(s) against its config: model.extra.weight"),
    ("wrong-shape", "{root}/wrong-shape", 2, "cannot load"),
]


def _table(rows: list[tuple]) -> pytest.MarkDecorator:
    """Parametrize over rows whose first column is the id: one failing row, one failing test."""
    return pytest.mark.parametrize("row", [row[1:] for row in rows], ids=[row[0] for row in rows])


@_table(CHECKPOINT_ROWS)
def test_a_checkpoint_that_does_not_match_its_config_is_refused(row, checkpoints, tiny_llama_path, capfd):
    path, code, message = row
    path = path.format(root=checkpoints, tiny=tiny_llama_path)
    assert main(["check", path, "--dtype", "float16", "-q"]) == code
    err = capfd.readouterr().err
    if message is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith(f"dtypelint: error: cannot load {path}") and message in err


TABLE = "[tool.dtypelint]\n"
AT_MOST_1 = "must be a positive number, at most 1"
SETTINGS_ROWS = [
    # (id, pyproject.toml text, what the one line must say)
    ("fraction-nan", TABLE + "overflow-fraction = nan", "'overflow-fraction' " + AT_MOST_1 + ", not nan"),
    ("fraction-negative", TABLE + "overflow-fraction = -0.5", "'overflow-fraction' must be a positive number"),
    ("fraction-zero", TABLE + "overflow-fraction = 0", "'overflow-fraction' must be a positive number"),
    ("fraction-over-one", TABLE + "overflow-fraction = 1.5", "'overflow-fraction' " + AT_MOST_1 + ", not 1.5"),
    ("fraction-inf", TABLE + "overflow-fraction = inf", "'overflow-fraction' " + AT_MOST_1 + ", not inf"),
    ("fraction-bool", TABLE + "overflow-fraction = true", "'overflow-fraction' must be a positive number"),
    ("reduction-zero", TABLE + "large-reduction = 0", "'large-reduction' must be a positive integer, not 0"),
    ("reduction-negative", TABLE + "large-reduction = -5", "'large-reduction' must be a positive integer"),
    ("reduction-float", TABLE + "large-reduction = 1.5", "'large-reduction' must be a positive integer, not 1.5"),
    ("reduction-nan", TABLE + "large-reduction = nan", "'large-reduction' must be a positive integer, not nan"),
    ("tool-is-an-integer", "tool = 5", "'tool' must be a table, not an integer"),
    ("dtypelint-is-an-array", "[[tool.dtypelint]]\ndtype = 'float16'",
     "'tool.dtypelint' must be a table ([tool.dtypelint]), not an array of tables"),
    ("dtypelint-is-a-string", "[tool]\ndtypelint = 'float16'", "'tool.dtypelint' must be a table"),
]


@_table(SETTINGS_ROWS)
def test_settings_that_make_no_sense_are_refused(row, tmp_path, tiny_llama_path, capfd):
    text, message = row
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(text + "\n")
    assert main(["check", str(tiny_llama_path), "--config", str(pyproject), "-q"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dtypelint: error: {pyproject}: ") and message in err


OPTION_ROWS = [
    # (id, Options keyword arguments, what the UsageError says)
    ("fraction-nan", {"overflow_fraction": math.nan}, "overflow_fraction " + AT_MOST_1 + ", not nan"),
    ("fraction-inf", {"overflow_fraction": math.inf}, "overflow_fraction " + AT_MOST_1 + ", not inf"),
    ("fraction-zero", {"overflow_fraction": 0.0}, "overflow_fraction " + AT_MOST_1 + ", not 0.0"),
    ("fraction-over-one", {"overflow_fraction": 2}, "overflow_fraction " + AT_MOST_1 + ", not 2"),
    ("fraction-string", {"overflow_fraction": "0.5"}, "overflow_fraction " + AT_MOST_1 + ", not '0.5'"),
    ("reduction-zero", {"large_reduction": 0}, "large_reduction must be a positive integer, not 0"),
    ("reduction-float", {"large_reduction": 10.0}, "large_reduction must be a positive integer, not 10.0"),
    ("reduction-bool", {"large_reduction": True}, "large_reduction must be a positive integer, not True"),
]


@_table(OPTION_ROWS)
def test_the_api_shares_the_settings_check(row):
    values, message = row
    with pytest.raises(UsageError) as raised:
        Options(**values)
    assert str(raised.value) == message


def test_sensible_options_are_kept():
    assert Options(overflow_fraction=1, large_reduction=10) == Options(overflow_fraction=1.0, large_reduction=10)


SAMPLE_ROWS = [
    # (id, audit_config keyword arguments, what the UsageError says): the API gets the CLI's check
    ("seq-len-over-positions", {"seq_len": 513}, "seq_len 513 is longer than the config's max_position_embeddings 512"),
    ("seq-len-zero", {"seq_len": 0}, "seq_len must be a positive integer, not 0"),
    ("batch-float", {"batch": 1.5}, "batch must be a positive integer, not 1.5"),
]


def test_real_sample_inputs_are_capped_fake_ones_are_not(tiny_llama_fp16):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dtypelint.load import sample_inputs

    with pytest.raises(UsageError, match="batch \\* seq_len is 2097152 tokens, over the cap of 1048576"):
        sample_inputs(tiny_llama_fp16, tiny_llama_fp16.config, batch=4096, seq_len=512)
    with FakeTensorMode():
        inputs = sample_inputs(tiny_llama_fp16, tiny_llama_fp16.config, batch=4096, seq_len=512)
    assert inputs["input_ids"].shape == (4096, 512)


@_table(SAMPLE_ROWS)
def test_the_api_refuses_sample_sizes_that_cannot_run(row, tiny_llama_path):
    sizes, message = row
    import dtypelint

    with pytest.raises(UsageError) as raised:
        dtypelint.audit_config(tiny_llama_path, **sizes)
    assert str(raised.value) == message
