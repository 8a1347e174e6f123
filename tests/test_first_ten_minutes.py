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
