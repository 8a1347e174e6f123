"""Attack table: inputs that once gave a wrong answer without a word (a clean report of random weights,
thirty false warnings from a nan threshold) are refused with exit code 2 and one line."""

from __future__ import annotations

import json
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


ENTRIES = '''
import os
import sys
import torch
from torch import nn


class Mixed(nn.Module):
    """An fp16 layer fed float32: DT001 and DT101, so the report has findings to print."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4).half()

    def forward(self, x):
        return self.lin(x)


class Chatty(Mixed):
    def forward(self, x):
        print("forward says hello")
        os.write(1, b"native code says hello\\n")
        print("to __stdout__", file=sys.__stdout__, flush=True)
        return super().forward(x)


class ClosesStdout(Mixed):
    def forward(self, x):
        sys.stdout.close()
        return super().forward(x)


class Deferred(nn.Module):
    def forward(self, x):
        yield x * 2


def chatty():
    print("building says hello")
    return Chatty(), torch.randn(2, 4)


def closes_stdout():
    return ClosesStdout(), torch.randn(2, 4)


def deferred():
    return Deferred(), torch.randn(2, 4)


def mixed():
    return Mixed(), torch.randn(2, 4)
'''


@pytest.fixture
def entries(tmp_path, monkeypatch) -> Path:
    (tmp_path / "sw_entries.py").write_text(ENTRIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("format", ["json", "sarif", "github", "text"])
def test_what_the_model_prints_goes_to_stderr_so_stdout_is_the_report(format, entries, capfd):
    assert main(["check", "--entry", "sw_entries:chatty", "--format", format]) == 1
    captured = capfd.readouterr()
    for said in ("building says hello", "forward says hello", "native code says hello", "to __stdout__"):
        assert said not in captured.out and said in captured.err
    if format in ("json", "sarif"):
        json.loads(captured.out)  # the whole of stdout is the document
    elif format == "github":
        assert all(line.startswith("::") for line in captured.out.splitlines())
    assert "DT101" in captured.out


def test_a_forward_that_closes_stdout_does_not_close_the_report(entries, capfd):
    assert main(["check", "--entry", "sw_entries:closes_stdout", "--format", "json"]) == 1
    assert {f["code"] for f in json.loads(capfd.readouterr().out)["findings"]} >= {"DT101"}


def test_a_generator_forward_is_not_reported_clean(entries, capfd):
    import dtypelint

    assert main(["check", "--entry", "sw_entries:deferred", "-q"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "Deferred.forward returns a generator, so calling it runs nothing" in err
    with pytest.raises(UsageError, match="returns a generator"):
        dtypelint.audit(*__import__("sw_entries").deferred())


def test_a_report_that_cannot_be_written_is_one_line(entries):
    """stdout on /dev/full: the report cannot be written, and that is said, not an internal error."""
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "dtypelint.cli", "check", "--entry", "sw_entries:mixed", "-q"],
                                cwd=entries, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "dtypelint: error: cannot write the report to stdout: No space left on device\n"


USAGE_ROWS = [
    # (id, arguments after `check`, what the one line must say): each once checked nothing and exited 0
    ("select-empty", ["{tiny}", "--select", ""], "select names no rule, so every rule would be off"),
    ("select-only-commas", ["{tiny}", "--select", " , "], "select names no rule"),
    ("attn-typo", ["{tiny}", "--attn-implementation", "flash_attention2"],
     "unknown attn_implementation 'flash_attention2'; this transformers knows eager, "),
    ("path-and-entry", ["{tiny}", "--entry", "sw_entries:mixed"], "give a PATH or --entry MODULE:FUNCTION, not both"),
    ("static-and-entry", ["--static", "--entry", "sw_entries:mixed"], "--static reads a checkpoint's safetensors"),
    ("static-and-graph", ["{tiny}", "--static", "--graph", "{tmp}/g.json"], "--graph needs a forward"),
]


@_table(USAGE_ROWS)
def test_options_that_would_check_nothing_are_usage_errors(row, entries, tiny_llama_path, capfd):
    arguments, message = row
    arguments = [a.format(tiny=tiny_llama_path, tmp=entries) for a in arguments]
    assert main(["check", *arguments, "-q"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dtypelint: error: ") and message in err, err
    assert not (entries / "g.json").exists()


def test_the_api_and_the_settings_file_refuse_the_same(tmp_path, tiny_llama_fp16, tiny_llama_path):
    import dtypelint

    inputs = {"input_ids": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(UsageError, match="select names no rule"):
        dtypelint.audit(tiny_llama_fp16, inputs, select=[])
    with pytest.raises(UsageError, match="unknown attn_implementation 'flash_attention2'"):
        dtypelint.audit(tiny_llama_fp16, inputs, attn_implementation="flash_attention2")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("[tool.dtypelint]\nselect = []\n")
    assert main(["check", "--config", str(pyproject), "--mode", "meta", str(tiny_llama_path), "-q"]) == 2
    # A deliberate empty selection plus extend-select is a selection, and runs.
    assert dtypelint.audit(tiny_llama_fp16, inputs, select=[], extend_select=["DT101"]).errors == []
