"""The command line: what it prints and its exit codes."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["check", "/no/such/dir"], "does not exist"),
        (["check", "{empty}"], "empty directory"),
        (["check", "{tiny}", "--dtype", "float13"], "unknown dtype"),
        (["check", "{tiny}", "--backend", "nope"], "unknown backend"),
        (["explain", "ZZ999"], "unknown rule"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(arguments, message, tiny_llama_path, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    arguments = [a.format(empty=tmp_path / "empty", tiny=tiny_llama_path) for a in arguments]
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_rules_and_explain(capsys):
    assert main(["rules"]) == 0
    assert "DT101" in capsys.readouterr().out
    assert main(["explain", "mixed-input"]) == 0
    text = capsys.readouterr().out
    for section in ("## What it does", "## Why is this bad?", "## Example", "## Fix safety"):
        assert section in text
