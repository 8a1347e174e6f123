"""What a new user meets first: a fast command line that answers in one line, and output that says what
to do next."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DTYPELINT = Path(sys.executable).parent / "dtypelint"


def run_command(*arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(DTYPELINT), *arguments], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["check"], "check needs a PATH"),
        (["check", "/no/such/dir"], "does not exist"),
        (["check", "examples/tiny-llama", "--dtype", "fp17"], "unknown dtype 'fp17'"),
        (["check", "examples/tiny-llama", "--dtype", "fp17"], "fp16, fp32, fp64, half, auto"),
        (["check", "gpt2"], "hf download gpt2 --local-dir DIR; meta mode needs only --include config.json"),
        (["check", "examples/tiny-llama", "--backend", "cudaa"], "unknown backend 'cudaa'"),
        (["check", "examples/tiny-llama", "--format", "yaml"], "invalid choice: 'yaml'"),
        (["check", "examples/tiny-llama", "--graph", "out.png"], "cannot write a graph as '.png'"),
        (["check", "examples/tiny-llama", "--fix", "--save-fixed", "examples/tiny-llama"], "over its source"),
    ],
)
def test_usage_errors_answer_before_importing_torch(arguments, message):
    probe = textwrap.dedent(f"""
        import sys
        from dtypelint.cli import main
        code = main({arguments!r})
        print(code, "torch" in sys.modules, "transformers" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_version_and_help_start_with_what_it_is():
    version = run_command("--version")
    assert version.returncode == 0 and version.stdout.startswith("dtypelint 0.")
    help_text = run_command("--help").stdout
    assert help_text.split("\n\n")[1].startswith("Find dtype conflicts in a PyTorch model")
    check_help = " ".join(run_command("check", "--help").stdout.split())
    assert "ipex-llm-xpu; default: hf-eager" in check_help and "``" not in check_help


def test_every_option_of_every_command_has_help_text():
    from dtypelint.cli import _parser

    parser = _parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    for name, command in [("dtypelint", parser), *commands.items()]:
        silent = [action.option_strings or action.dest for action in command._actions if not action.help]
        assert silent == [], f"{name}: {silent}"


def test_entry_imports_from_the_current_directory_as_python_m_does(tmp_path):
    (tmp_path / "my_model.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, 8).half(), nn.Linear(8, 4)), torch.randn(2, 8, dtype=torch.float16)
    """))
    result = run_command("check", "--entry", "my_model:build", "-q", cwd=tmp_path)
    assert result.returncode == 1 and "DT101" in result.stdout, result.stderr
    assert str(tmp_path) not in sys.path


def test_a_fixed_entry_model_is_told_the_fix_lives_in_memory_only(tmp_path, monkeypatch, capsys):
    from dtypelint.cli import main

    (tmp_path / "stray_head.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, 8).half(), nn.Linear(8, 4)), torch.randn(2, 8, dtype=torch.float16)
    """))
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--entry", "stray_head:build", "--fix", "-q"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "applied in memory only: stray_head:build builds the model anew each run" in out
    assert "(1.weight -> float16, 1.bias -> float16)" in out and "dtypelint.apply_plan(model, FILE)" in out


def run_in_pty(*arguments: str) -> str:
    """The command's terminal output, run in a pseudo-terminal that reports no size (as CI's and some
    editors' terminals do)."""
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen([str(DTYPELINT), *arguments], cwd=ROOT, stdin=follower, stdout=follower,
                               stderr=follower, env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower closed: the command has ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=300)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_show_in_a_terminal_for_long_work_and_never_with_q():
    shown = run_in_pty("check", "examples/configs/llama-3-70b", "--mode", "meta")
    assert "loading (config):" in shown and "tracing:" in shown and "module/s" in shown
    assert "LlamaForCausalLM [meta, bfloat16, backend hf-eager]" in shown
    quiet = run_in_pty("check", "examples/configs/llama-3-70b", "--mode", "meta", "-q")
    assert "tracing" not in quiet and "loading" not in quiet


def test_every_error_row_names_its_root_cause(stray_fp32_layer):
    import torch

    import dtypelint

    report = dtypelint.audit(stray_fp32_layer, torch.randn(2, 16, dtype=torch.float16))
    assert {(finding.code, finding.tensor) for finding in report.errors} == {("DT001", "head.weight"),
                                                                              ("DT101", "head.weight")}


@pytest.fixture(scope="module")
def six_layer_flash_config(tmp_path_factory) -> Path:
    """The 70B example's config with six decoder layers: the same cause (float32 into flash attention) in each."""
    import json

    config = json.loads((ROOT / "examples" / "configs" / "llama-3-70b" / "config.json").read_text())
    folder = tmp_path_factory.mktemp("six-layers")
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    return folder


def _flash_check(folder: Path, capsys, *options: str) -> tuple[int, str]:
    from dtypelint.cli import main

    code = main(["check", str(folder), "--mode", "meta", "--dtype", "float32", "--backend", "cuda",
                 "--attn-implementation", "flash_attention_2", "-q", *options])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("format_name", ["concise", "full", "markdown", "github"])
def test_one_cause_in_every_layer_is_one_line_with_its_count(six_layer_flash_config, capsys, format_name):
    code, out = _flash_check(six_layer_flash_config, capsys, "--format", format_name)
    assert code == 1
    # The finding's own row or line (not the `explain` hint, not markdown's list of findings not drawn).
    rows = [line for line in out.splitlines() if "CUDA102" in line and "explain" not in line
            and not line.startswith("- ")]
    assert len(rows) == 1 and "model.layers.{0..5}.self_attn (6x)" in rows[0], out
    assert not [index for index in range(6) if f"layers.{index}.self_attn" in out], out
    if format_name != "github":  # workflow commands carry no summary
        assert "6 errors" in out  # the counts keep every finding


def test_json_and_sarif_keep_every_location_of_a_group(six_layer_flash_config, capsys):
    import json

    _, out = _flash_check(six_layer_flash_config, capsys, "--format", "json")
    report = json.loads(out)
    locations = [finding["location"] for finding in report["findings"] if finding["code"] == "CUDA102"]
    assert locations == [f"model.layers.{index}.self_attn" for index in range(6)]
    [group] = report["groups"]
    assert group["location"] == "model.layers.{0..5}.self_attn" and group["count"] == 6
    assert [report["findings"][index]["location"] for index in group["findings"]] == locations
    _, out = _flash_check(six_layer_flash_config, capsys, "--format", "sarif")
    results = json.loads(out)["runs"][0]["results"]
    assert sum(result["ruleId"] == "CUDA102" for result in results) == 6


def test_a_group_shows_the_indices_it_takes_and_keeps_other_causes_apart():
    from dtypelint.diagnostics import Finding, Severity, group_findings

    def finding(index: int, dtype: str = "float32") -> Finding:
        return Finding("DT101", "mixed-input", Severity.ERROR, f"h.{index}.mlp", f"h.{index}.mlp.weight", "aten.mm",
                       [dtype], f"h.{index}.mlp.weight is {dtype}")

    groups = group_findings([finding(index) for index in (0, 1, 2, 5, 7, 8)] + [finding(3, "float64")])
    assert [(group.finding.location, group.count) for group in groups] == [("h.{0..2,5,7,8}.mlp", 6), ("h.3.mlp", 1)]
    assert groups[0].finding.message == "h.{0..2,5,7,8}.mlp.weight is float32"


def test_the_shipped_rule_docs_are_the_rules_own():
    """``rule_docs.json`` is what the rules say of themselves now (``python -m dtypelint.formats.catalog``
    writes it): a rule changed without it fails here."""
    from dtypelint.formats.catalog import current_rule_docs
    from dtypelint.rule_docs import RULE_DOCS

    assert RULE_DOCS.read_text(encoding="utf-8") == current_rule_docs(), "run python -m dtypelint.formats.catalog"


@pytest.mark.parametrize("arguments", [["rules"], ["rules", "--format", "markdown"], ["explain", "DT101"],
                                       ["explain", "rotary-inv-freq-dtype"], ["explain", "NOPE"]])
def test_rules_and_explain_print_the_rules_own_text_without_importing_torch(arguments, tmp_path):
    """The same text as the rules themselves give (``--config`` takes the path that loads them), and no
    torch: the docs answer in a fraction of a second."""
    probe = textwrap.dedent(f"""
        import sys
        from dtypelint.cli import main
        code = main({arguments!r})
        assert "torch" not in sys.modules, "torch was imported"
        sys.exit(code)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fast = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    assert "torch was imported" not in fast.stderr
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    loaded = run_command(*arguments[:1], *(["--config", "pyproject.toml"] if arguments[0] == "rules" else []),
                         *arguments[1:], cwd=tmp_path)
    assert (fast.returncode, fast.stdout, fast.stderr) == (loaded.returncode, loaded.stdout, loaded.stderr)
    assert fast.returncode == (2 if "NOPE" in arguments else 0) and (fast.stdout or fast.stderr)


def test_a_pyproject_that_configures_dtypelint_still_says_which_rules_are_enabled(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.dtypelint]\nignore = ["DT106"]\n')
    listed = run_command("rules", cwd=tmp_path)
    assert listed.returncode == 0
    [row] = [line for line in listed.stdout.splitlines() if line.startswith("DT106")]
    assert row.split()[5] == "no"


NOISY_ENTRY = """
import logging
import sys
import warnings

import torch
from torch import nn

def build():
    warnings.warn("the old_api module is deprecated", FutureWarning)
    banner = logging.getLogger("somepackage")
    banner.addHandler(logging.StreamHandler())  # sys.stderr, as ipex-llm's own handler
    banner.setLevel(logging.INFO)
    banner.info("Converting the current model to sym_int4 format......")
    return nn.Sequential(nn.Linear(8, 8).half()), torch.randn(2, 8, dtype=torch.float16)
"""


@pytest.mark.parametrize(("loudness", "shown"), [([], "counted"), (["-v"], "every line"), (["-q"], "nothing")])
def test_other_packages_warnings_and_log_lines_are_counted_unless_asked_for(tmp_path, loudness, shown):
    (tmp_path / "noisy.py").write_text(NOISY_ENTRY)
    result = run_command("check", "--entry", "noisy:build", *loudness, cwd=tmp_path)
    assert result.returncode == 0 and "0 errors" in result.stdout, result.stderr
    texts = ("old_api module is deprecated", "Converting the current model")
    if shown == "every line":
        assert all(text in result.stderr for text in texts), result.stderr
        assert "-v shows them" not in result.stderr
    else:
        assert not any(text in result.stderr for text in texts), result.stderr
        counted = ("other packages printed 2 warnings or log lines while loading and tracing "
                   "(somepackage log, FutureWarning); -v shows them")
        assert (counted in result.stderr) == (shown == "counted"), result.stderr


@pytest.mark.parametrize("attn_implementation", [None, "sdpa"])
def test_a_transformers_check_does_not_import_diffusers(attn_implementation, tmp_path):
    """diffusers (0.2 s of imports) is read only for an attention name transformers does not know."""
    chosen = [] if attn_implementation is None else ["--attn-implementation", attn_implementation]
    probe = textwrap.dedent(f"""
        import sys
        from dtypelint.cli import main
        code = main(["check", {str(ROOT / "examples" / "configs" / "llama-3-70b")!r}, "--mode", "meta", "-q", *{chosen!r}])
        assert "diffusers" not in sys.modules, "diffusers was imported"
        sys.exit(code)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    checked = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env,
                             timeout=300)
    assert "diffusers was imported" not in checked.stderr
    assert checked.returncode in (0, 1), checked.stderr
