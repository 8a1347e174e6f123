"""The command line: what it prints and its exit codes."""

from __future__ import annotations

import json
import shutil

import pytest

from dtypelint.cli import main


def test_check_of_the_example_prints_a_summary_and_exits_clean(tiny_llama_path, capsys):
    assert main(["check", str(tiny_llama_path), "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM [value, float16, backend hf-eager]: 0 errors" in out


def test_check_of_a_config_runs_in_meta_mode_as_json(tiny_llama_path, capsys):
    assert main(["check", str(tiny_llama_path / "config.json"), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "meta" and data["compute_dtype"] == "float16" and data["findings"] == []


def broken_checkpoints(tmp_path, tiny):
    """Directories that cannot be loaded, each broken in one way."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-config").mkdir()
    shutil.copy(tiny / "model.safetensors", tmp_path / "no-config")
    for name, mutate in {
        "truncated": lambda d: (d / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes()[:5000]),
        "corrupt": lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}garbage"),
        "unknown-type": lambda d: (d / "config.json").write_text(json.dumps({"model_type": "no-such-arch"})),
        "remote-code": lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((tiny / "config.json").read_text()), "auto_map": {"AutoModelForCausalLM": "m.M"}})
        ),
        "low-bit": lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((tiny / "config.json").read_text()), "bigdl_transformers_low_bit": "sym_int4"})
        ),
    }.items():
        shutil.copytree(tiny, tmp_path / name)
        mutate(tmp_path / name)
    (tmp_path / "entries.py").write_text(
        "import torch\n"
        "def wrong():\n    return 42\n"
        "def good():\n    return torch.nn.Linear(4, 4).half(), torch.randn(2, 4)\n"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["check", "/no/such/dir"], "does not exist"),
        (["check", "{tmp}/empty"], "empty directory"),
        (["check", "{tmp}/no-config"], "has no config.json"),
        (["check", "{tmp}/truncated"], "cannot load"),
        (["check", "{tmp}/corrupt"], "cannot load"),
        (["check", "{tmp}/truncated", "--static"], "not a valid safetensors file: the header describes"),
        (["check", "{tmp}/corrupt", "--static"], "not a valid safetensors file: the header is not valid JSON"),
        (["check", "{tmp}/unknown-type"], "no-such-arch"),
        (["check", "{tmp}/remote-code"], "--trust-remote-code"),
        (["check", "{tmp}/low-bit"], "install the ipex extra"),
        (["check", "{tiny}", "--dtype", "float13"], "unknown dtype"),
        (["check", "{tiny}", "--backend", "nope"], "unknown backend"),
        (["check", "--entry", "no_such_module_xyz:build"], "cannot import no_such_module_xyz"),
        (["check", "--entry", "entries:missing"], "entries has no missing"),
        (["check", "--entry", "entries:wrong"], "must return (model, inputs)"),
        (["check", "--entry", "entries"], "must look like module.path:function"),
        (["check"], "needs a PATH"),
        (["check", "{tmp}/empty-config", "--fix"], "fixes need real weights"),
        (["explain", "ZZ999"], "unknown rule"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(arguments, message, tiny_llama_path, tmp_path, capsys, monkeypatch):
    broken_checkpoints(tmp_path, tiny_llama_path)
    (tmp_path / "empty-config").mkdir()
    shutil.copy(tiny_llama_path / "config.json", tmp_path / "empty-config")
    monkeypatch.syspath_prepend(str(tmp_path))
    arguments = [a.format(tmp=tmp_path, tiny=tiny_llama_path) for a in arguments]
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_rules_and_explain(capsys, tmp_path, monkeypatch):
    assert main(["rules"]) == 0
    assert "DT101" in capsys.readouterr().out
    assert main(["rules", "--backend", "hf-eager"]) == 0
    listed = capsys.readouterr().out
    assert "DT105" in listed and "IPX101" not in listed
    assert main(["rules", "--backend", "ipex-llm-xpu", "--format", "markdown"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| IPX101 |"))
    assert row.split(" | ")[1:6] == ["rotary-inv-freq-dtype", "ipex-llm-xpu", "error", "sometimes", "yes"]
    (tmp_path / "pyproject.toml").write_text('[tool.dtypelint]\nignore = ["DT106"]\n')
    monkeypatch.chdir(tmp_path)
    assert main(["rules", "--format", "markdown"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| DT106 |"))
    assert row.split(" | ")[5] == "no"  # the project's selection says which rules run
    assert main(["explain", "mixed-input"]) == 0
    text = capsys.readouterr().out
    for section in ("## What it does", "## Why is this bad?", "## Example", "## Fix safety"):
        assert section in text


def test_exit_codes_follow_fail_on_and_exit_zero(tmp_path, tiny_llama_path, capsys, monkeypatch):
    broken_checkpoints(tmp_path, tiny_llama_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    # An fp16 Linear fed fp32 input: the forward raises (DT001, DT101 errors).
    assert main(["check", "--entry", "entries:good"]) == 1
    assert "DT101" in capsys.readouterr().out
    assert main(["check", "--entry", "entries:good", "--exit-zero"]) == 0
    assert main(["check", "--entry", "entries:good", "--ignore", "DT001,DT101"]) == 0
    assert main(["check", "--entry", "entries:good", "--ignore", "DT001,DT101", "--fail-on", "info"]) == 0


def test_graph_static_and_json_outputs(tmp_path, tiny_llama_path, capsys):
    assert main(["check", str(tiny_llama_path), "--graph", str(tmp_path / "g.graphml"), "-q"]) == 0
    assert (tmp_path / "g.graphml").read_text().startswith("<?xml")
    capsys.readouterr()
    assert main(["check", str(tiny_llama_path), "--static"]) == 0
    assert "float16" in capsys.readouterr().out
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_llama_path, mixed)
    config = json.loads((mixed / "config.json").read_text())
    (mixed / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    assert main(["check", str(mixed), "--static"]) == 0
    assert main(["check", str(mixed), "--static", "--fail-on", "warning"]) == 1
    out = capsys.readouterr().out
    assert "model.norm holds weight float16 in a bfloat16 model" in out
    assert "note: stored dtypes: 21 float16" in out and "LlamaForCausalLM [static, bfloat16" in out
    # --dtype is the deployment dtype: it beats the config's, both ways
    assert main(["check", str(mixed), "--static", "--fail-on", "warning", "--dtype", "float16"]) == 0
    assert main(["check", str(tiny_llama_path), "--static", "--fail-on", "warning", "--dtype", "bf16"]) == 1
    capsys.readouterr()
    assert main(["check", str(tiny_llama_path), "--static", "--format", "json", "--dtype", "bf16"]) == 0
    data = json.loads(capsys.readouterr().out)  # --static renders through the same formats as a check
    assert data["mode"] == "static" and data["summary"]["warning"] == 21
    assert {f["code"] for f in data["findings"]} == {"DT105"}


@pytest.mark.parametrize("format", ["sarif", "github", "markdown", "json"])
def test_every_format_is_reachable_from_the_command_line(format, tmp_path, tiny_llama_path, capsys, monkeypatch):
    broken_checkpoints(tmp_path, tiny_llama_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["check", "--entry", "entries:good", "--format", format]) == 1
    out = capsys.readouterr().out
    assert "DT101" in out
    if format in ("sarif", "json"):
        json.loads(out)


def test_every_rule_is_listed_and_explained(capsys):
    from dtypelint.rules import all_rules

    rules = all_rules()
    assert main(["rules"]) == 0
    listing = capsys.readouterr().out
    for rule in rules:
        assert rule.code in listing
        assert main(["explain", rule.code]) == 0
        text = capsys.readouterr().out
        assert f"# {rule.name} ({rule.code})" in text and rule.category in text
        for section in ("## What it does", "## Why is this bad?", "## Fix safety"):
            assert section in text, (rule.code, section)
        if hasattr(rule, "contract"):  # a kernel contract cites where its facts come from
            assert "## References" in text and "## Contract" in text
