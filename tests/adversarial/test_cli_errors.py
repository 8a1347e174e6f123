"""Attack table: every failure of ``dtypelint`` is exit code 2 and one line on stderr, before the long work.

Each row is one input that once ended in a traceback, a usage block or a message that said too little.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from dtypelint.cli import main
from dtypelint.errors import LoadError

ENTRIES = '''
import sys
import torch

not_a_function = 5

def raises():
    raise RuntimeError("the entry failed")

def exits():
    sys.exit(3)

def interrupted():
    raise KeyboardInterrupt

class ExitingLinear(torch.nn.Linear):
    def forward(self, x):
        sys.exit(4)

class OddModel(torch.nn.Linear):
    def named_buffers(self, *args, **kwargs):
        raise TypeError("odd model")

def exits_in_forward():
    return ExitingLinear(4, 4), torch.randn(2, 4)

def odd_model():
    return OddModel(4, 4), torch.randn(2, 4)
'''


def _with_config(tiny: Path, target: Path, weights: bool, **changes: object) -> None:
    """A copy of the example whose config.json has ``changes``; without weights it is a meta-mode input."""
    target.mkdir()
    config = json.loads((tiny / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    if weights:
        shutil.copy(tiny / "model.safetensors", target)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_llama_path: Path) -> Path:
    """Every broken input of the table, built once."""
    root = tmp_path_factory.mktemp("attacks")
    bad_configs = {
        "negative-hidden": {"hidden_size": -64},
        "zero-heads": {"num_attention_heads": 0},
        "string-hidden": {"hidden_size": "sixty-four"},
        "bool-layers": {"num_hidden_layers": True},
        "indivisible": {"num_attention_heads": 5},
        "unknown-activation": {"hidden_act": "no-such-activation"},
        **WRONG_KINDS,
    }
    for name, changes in bad_configs.items():
        _with_config(tiny_llama_path, root / f"meta-{name}", weights=False, **changes)
        _with_config(tiny_llama_path, root / f"value-{name}", weights=True, **changes)
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    (root / "dangling").symlink_to(root / "nowhere")
    _with_config(tiny_llama_path, root / "weights-loop", weights=False)
    (root / "weights-loop" / "model.safetensors").symlink_to(root / "weights-loop" / "model.safetensors")
    sharded = root / "index-without-metadata"
    _with_config(tiny_llama_path, sharded, weights=False)
    shutil.copy(tiny_llama_path / "model.safetensors", sharded / "model-00001-of-00001.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    missing_shard = root / "index-missing-shard"
    shutil.copytree(sharded, missing_shard)
    (missing_shard / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    (root / "a-file").write_text("not a directory")
    (root / "out-dir.json").mkdir()
    (root / "adv_entries.py").write_text(ENTRIES)
    (root / "adv_syntax_error.py").write_text("def broken(:\n")
    (root / "adv_raises_at_import.py").write_text("raise ValueError('import-time failure')\n")
    return root


# Fields of the wrong kind, which once ended as "internal error" (transformers 5's validation, a bad
# dtype name), a finding of a forward that could never run, or (transformers 4) a silent audit.
WRONG_KINDS = {
    "dtype-unknown": {"torch_dtype": "float99"},
    "dtype-5-unknown": {"dtype": "float99"},
    "dtype-a-number": {"torch_dtype": 5},
    "eps-a-string": {"rms_norm_eps": "abc"},
    "rope-theta-a-list": {"rope_theta": [1]},
    "activation-a-number": {"hidden_act": 5},
    "tie-a-string": {"tie_word_embeddings": "yes"},
    "architectures-a-string": {"architectures": "LlamaForCausalLM"},
    "architectures-of-numbers": {"architectures": [5]},
    "rope-scaling-a-number": {"rope_scaling": 5},
    "negative-positions": {"max_position_embeddings": -1},
    "kv-heads-indivisible": {"num_key_value_heads": 3},
}

# Config values that cannot make a model: a config error naming the file (and the field where dtypelint
# can know it), the same in meta and in value mode.
CONFIG_ROWS = [
    ("negative-hidden", "'hidden_size' must be a positive integer, not -64"),
    ("zero-heads", "'num_attention_heads' must be a positive integer, not 0"),
    ("string-hidden", "'hidden_size' must be a positive integer, not 'sixty-four'"),
    ("bool-layers", "'num_hidden_layers' must be a positive integer, not True"),
    ("indivisible", "'hidden_size' 64 is not divisible by 'num_attention_heads' 5"),
    ("dtype-unknown", "'torch_dtype' must name a torch dtype (\"float16\", \"bfloat16\", \"float32\", ...), not 'float99'"),
    ("dtype-5-unknown", "'dtype' must name a torch dtype"),
    ("dtype-a-number", "'torch_dtype' must name a torch dtype (\"float16\", \"bfloat16\", \"float32\", ...), not 5"),
    ("eps-a-string", "'rms_norm_eps' must be a number, not 'abc'"),
    # transformers 4: its default says a number; transformers 5 keeps it in rope_parameters and the build fails
    ("rope-theta-a-list", ""),
    ("activation-a-number", "'hidden_act' must be a string, not 5"),
    ("tie-a-string", "'tie_word_embeddings' must be a boolean, not 'yes'"),
    ("architectures-a-string", "'architectures' must be a list of class names, not 'LlamaForCausalLM'"),
    ("architectures-of-numbers", "'architectures' must be a list of class names, not [5]"),
    ("rope-scaling-a-number", "cannot build a config for model_type 'llama': "),
    ("negative-positions", "'max_position_embeddings' must be a positive integer, not -1"),
    ("kv-heads-indivisible", "'num_attention_heads' 4 is not divisible by 'num_key_value_heads' 3"),
]

ROWS = [
    # (id, arguments, what the one line must say)
    *[(f"{mode}-{name}", ["check", f"{{ws}}/{mode}-{name}"], f"error: {{ws}}/{mode}-{name}/config.json: {message}")
      for name, message in CONFIG_ROWS for mode in ("meta", "value")],
    *[(f"{mode}-build-fails", ["check", f"{{ws}}/{mode}-unknown-activation"],
       f"error: {{ws}}/{mode}-unknown-activation/config.json: cannot build a causal LM for model_type 'llama'")
      for mode in ("meta", "value")],
    # Sample sizes: positive, bounded, within the config's positions.
    ("seq-len-huge", ["check", "{tiny}", "--seq-len", "1000000000"], "over the cap of 1048576"),
    ("seq-len-huge-meta", ["check", "{tiny}", "--mode", "meta", "--seq-len", "1000000000"], "longer than the config's max_position_embeddings 512"),
    ("batch-times-seq-len", ["check", "{tiny}", "--batch", "4096", "--seq-len", "512"], "over the cap of 1048576"),
    ("seq-len-over-positions", ["check", "{tiny}", "--seq-len", "513"],
     "longer than the config's max_position_embeddings 512"),
    ("seq-len-zero", ["check", "{tiny}", "--seq-len", "0"], "argument --seq-len: must be a positive integer, not '0'"),
    ("batch-negative", ["check", "{tiny}", "--batch", "-2"], "argument --batch: must be a positive integer, not '-2'"),
    # Output paths, refused before loading.
    ("graph-parent-missing", ["check", "{tiny}", "--graph", "/proc/nope/g.json"], "/proc/nope does not exist"),
    ("graph-under-a-file", ["check", "{tiny}", "--graph", "{ws}/a-file/g.json"], "a-file is not a directory"),
    ("graph-is-a-directory", ["check", "{tiny}", "--graph", "{ws}/out-dir.json"], "out-dir.json is a directory"),
    ("graph-unwritable", ["check", "{tiny}", "--graph", "/proc/g.json"], "--graph /proc/g.json: cannot write there"),
    ("graph-bad-extension", ["check", "{tiny}", "--graph", "{ws}/g.png"], "cannot write a graph as '.png'"),
    ("plan-is-a-directory", ["check", "{tiny}", "--fix", "--write-plan", "{ws}/out-dir.json"], "is a directory"),
    ("plan-unwritable", ["check", "{tiny}", "--fix", "--write-plan", "/proc/plan.json"], "cannot write there"),
    ("plan-parent-missing", ["check", "{tiny}", "--diff", "--write-plan", "/proc/nope/p.json"], "does not exist"),
    # --entry: whatever the user's code does is an error of the entry.
    ("entry-raises", ["check", "--entry", "adv_entries:raises"], "raised RuntimeError: the entry failed"),
    ("entry-exits", ["check", "--entry", "adv_entries:exits"], "raised SystemExit(3)"),
    ("entry-not-callable", ["check", "--entry", "adv_entries:not_a_function"], "not_a_function is not callable"),
    ("entry-syntax-error", ["check", "--entry", "adv_syntax_error:f"], "importing adv_syntax_error raised SyntaxError"),
    ("entry-import-raises", ["check", "--entry", "adv_raises_at_import:f"], "raised ValueError: import-time failure"),
    ("model-exits-in-forward", ["check", "--entry", "adv_entries:exits_in_forward"], "called sys.exit(4)"),
    # Ctrl-C anywhere: one line, exit 2.
    ("interrupt", ["check", "--entry", "adv_entries:interrupted"], "dtypelint: interrupted"),
    # An exception dtypelint does not know: one line naming its type, and the way to the traceback.
    ("internal-error", ["check", "--entry", "adv_entries:odd_model"],
     "dtypelint: internal error: TypeError: odd model; rerun with --debug"),
    # Paths that said too little.
    ("symlink-loop", ["check", "{ws}/loop-a"], "loop-a is a symlink loop"),
    ("dangling-symlink", ["check", "{ws}/dangling"], "which does not exist"),
    ("weights-loop-static", ["check", "{ws}/weights-loop", "--static"], "model.safetensors is a symlink loop"),
    ("weights-file", ["check", "{tiny}/model.safetensors"], "is a weights file; pass the checkpoint directory"),
    ("hub-id", ["check", "gpt2"], "dtypelint downloads nothing"),
    ("hub-id-with-owner", ["check", "meta-llama/Llama-3.1-8B"], "dtypelint downloads nothing"),
    ("index-without-metadata", ["check", "{ws}/index-without-metadata"],
     "a shard index needs 'metadata' and 'weight_map'; it has no 'metadata'"),
    ("index-missing-shard", ["check", "{ws}/index-missing-shard"], "names 1 shard(s) that do not exist"),
    # argparse: one line and a pointer to --help, not a usage block.
    ("unknown-format", ["check", "{tiny}", "--format", "x"],
     "argument --format: invalid choice: 'x' (choose from 'text', 'concise', 'full', 'json', 'sarif', 'github', "
     "'markdown', 'html'); see 'dtypelint check --help'"),
    ("bad-fail-on", ["check", "{tiny}", "--fail-on", "fatal"], "argument --fail-on: invalid choice: 'fatal'"),
    ("seq-len-not-a-number", ["check", "{tiny}", "--seq-len", "abc"], "must be a positive integer, not 'abc'"),
    ("unknown-option", ["check", "{tiny}", "--frobnicate"], "unrecognized arguments: --frobnicate; see"),
    ("unknown-command", ["lint"], "argument COMMAND: invalid choice: 'lint'"),
    ("no-command", [], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize(("arguments", "message"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
@pytest.mark.parametrize("quiet", [False, True], ids=["", "q"])
def test_failure_is_exit_2_and_one_line(arguments, message, quiet, workspace, tiny_llama_path, capfd, monkeypatch):
    monkeypatch.syspath_prepend(str(workspace))
    arguments = [a.format(ws=workspace, tiny=tiny_llama_path) for a in arguments]
    message = message.format(ws=workspace)
    if quiet and arguments[:1] == ["check"]:
        arguments.append("-q")
    assert main(arguments) == 2
    # transformers 4 leaves its build-time default dtype behind when a build raises; dtypelint restores it
    assert torch.get_default_dtype() == torch.float32
    err = capfd.readouterr().err
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("dtypelint: ") and message in last and "Traceback" not in err
    if quiet:  # -q: the error line is all of stderr, whatever the libraries had to say
        assert err.count("\n") == 1, err


def test_the_error_line_stands_alone_after_library_noise(workspace, tiny_llama_path, capfd):
    """Without -q, libraries may talk; the error is still the last line, on its own."""
    assert main(["check", f"{workspace}/value-unknown-activation"]) == 2
    last = capfd.readouterr().err.splitlines()[-1]
    assert last.startswith(f"dtypelint: error: {workspace}/value-unknown-activation/config.json: cannot build")


def test_debug_shows_the_traceback_down_to_the_user_code_and_exits_2(workspace, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(workspace))
    assert main(["--debug", "check", "--entry", "adv_entries:raises"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "adv_entries.py" in err and "RuntimeError: the entry failed" in err
    assert err.strip().splitlines()[-1].startswith("dtypelint: error: --entry 'adv_entries:raises' raised")
    assert main(["--debug", "check", "--entry", "adv_entries:odd_model"]) == 2
    err = capsys.readouterr().err
    assert "TypeError: odd model" in err and err.strip().splitlines()[-1].startswith("dtypelint: internal error")


def test_output_paths_are_checked_before_loading(tiny_llama_path, capfd):
    """A bad --graph fails at once, even for a checkpoint that would take long to load: the load
    never starts, so its (meta-mode) config error is not what is reported."""
    assert main(["check", "gpt2", "--graph", "/proc/nope/g.json"]) == 2
    assert "/proc/nope does not exist" in capfd.readouterr().err


def test_a_command_leaves_logging_and_warning_filters_as_they_were(workspace, tiny_llama_path, capfd):
    from transformers.utils import logging as transformers_logging

    before = (transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled(),
              logging.root.manager.disable, list(warnings.filters))
    assert main(["check", str(tiny_llama_path), "-q"]) == 0
    assert main(["check", f"{workspace}/value-unknown-activation", "-q"]) == 2
    after = (transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled(),
             logging.root.manager.disable, list(warnings.filters))
    assert after == before


def test_no_config_that_transformers_writes_with_its_defaults_is_refused():
    """The config checks refuse what no model can have, never what a config class itself writes: per-stage
    head counts (SegFormer's list), a family with its own head size (Reformer's 256 / 12), a layer count per
    tower (LXMERT's table). Every model type of this transformers, saved with its defaults, passes."""
    from transformers import CONFIG_MAPPING

    from dtypelint.load import check_config_fields, check_config_sizes, check_model_size

    checked, refused = 0, []
    for model_type in CONFIG_MAPPING:
        try:
            config = CONFIG_MAPPING[model_type]()
            data = json.loads(config.to_json_string(use_diff=False))
        except Exception:  # noqa: BLE001 - a class without defaults (encoder-decoder wrappers) writes nothing
            continue
        checked += 1
        try:
            check_config_sizes(data, Path(model_type))
            check_config_fields(data, Path(model_type))
            check_model_size(config, source=Path(model_type))
        except LoadError as error:
            refused.append(str(error))
    assert checked > 200 and refused == []
