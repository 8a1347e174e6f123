"""Attacks on the user's files: a fixed checkpoint never lands on, in or around its source, ``--force``
never deletes what an earlier save did not write, and nothing half-written stays behind."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dtypelint
from dtypelint import FixPlan, UsageError
from dtypelint.cli import main
from dtypelint.drawing import write_graph
from dtypelint.save import PLAN_FILE

EMPTY_PLAN = FixPlan("LlamaForCausalLM", [])


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: what must survive an attack unchanged."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tmp_path, tiny_llama_path) -> Path:
    """``parent/`` holding the checkpoint ``src/``, an unrelated ``notes.txt`` and a symlink to ``src``."""
    parent = tmp_path / "parent"
    shutil.copytree(tiny_llama_path, parent / "src")
    (parent / "notes.txt").write_text("three weeks of experiment notes")
    (tmp_path / "link-to-src").symlink_to(parent / "src")
    (tmp_path / "link-to-parent").symlink_to(parent)
    return tmp_path


# target, source, options, message; paths are relative to the workspace, "{cwd}" runs from parent/.
REFUSED = [
    ("parent/src", "parent/src", [], "over its source checkpoint"),
    ("parent/src", "parent/src", ["--force"], "over its source checkpoint"),
    ("parent", "parent/src", ["--force"], "contains the source checkpoint"),
    (".", "src", ["--force"], "contains the source checkpoint"),
    ("parent/src/fixed", "parent/src", [], "inside its source checkpoint"),
    ("parent/src/fixed", "parent/src", ["--force"], "inside its source checkpoint"),
    ("link-to-src", "parent/src", ["--force"], "over its source checkpoint"),
    ("link-to-parent", "parent/src", ["--force"], "contains the source checkpoint"),
    ("parent", "link-to-src", ["--force"], "contains the source checkpoint"),
    ("link-to-src/fixed", "parent/src", [], "inside its source checkpoint"),
    ("parent/src/config.json", "parent/src/config.json", ["--force"], "inside its source checkpoint"),
    ("parent/notes.txt", "parent/src", ["--force"], "is not a directory"),
]


@pytest.mark.parametrize(("target", "source", "options", "message"), REFUSED)
def test_the_command_refuses_a_target_on_in_or_around_the_source(
    workspace, monkeypatch, capsys, target, source, options, message
):
    if target == ".":
        monkeypatch.chdir(workspace / "parent")
        source = str(workspace / "parent" / source)
    else:
        target, source = str(workspace / target), str(workspace / source)
    before = tree(workspace / "parent")
    code = main(["check", source, "--dtype", "float16", "--fix", "--unsafe-fixes", "--save-fixed", target, *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert tree(workspace / "parent") == before
    assert not list(workspace.rglob(".*dtypelint-staging*"))


@pytest.mark.parametrize(("target", "source", "options", "message"), REFUSED)
def test_the_api_refuses_the_same_targets(workspace, monkeypatch, tiny_llama_fp16, target, source, options, message):
    if target == ".":
        monkeypatch.chdir(workspace / "parent")
        source = workspace / "parent" / source
    else:
        target, source = workspace / target, workspace / source
    before = tree(workspace / "parent")
    with pytest.raises(UsageError, match=message):
        dtypelint.save_fixed(tiny_llama_fp16, target, EMPTY_PLAN, source=source, force="--force" in options)
    assert tree(workspace / "parent") == before


def test_the_directory_the_model_was_loaded_from_is_protected_without_naming_it(workspace):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workspace / "parent" / "src")
    before = tree(workspace / "parent")
    with pytest.raises(UsageError, match="contains the source checkpoint"):
        dtypelint.save_fixed(model, workspace / "parent", EMPTY_PLAN, force=True)
    assert tree(workspace / "parent") == before


def test_force_replaces_only_a_directory_an_earlier_save_wrote(tmp_path, tiny_llama_fp16):
    unrelated = tmp_path / "results"
    unrelated.mkdir()
    (unrelated / "table.csv").write_text("a,b\n")
    with pytest.raises(UsageError, match=f"holds no {PLAN_FILE}"):
        dtypelint.save_fixed(tiny_llama_fp16, unrelated, EMPTY_PLAN, force=True)
    assert tree(unrelated) == {"table.csv": b"a,b\n"}
    saved = dtypelint.save_fixed(tiny_llama_fp16, tmp_path / "fixed", EMPTY_PLAN)
    assert dtypelint.save_fixed(tiny_llama_fp16, saved, EMPTY_PLAN, force=True) == saved
    assert (saved / PLAN_FILE).is_file() and (saved / "config.json").is_file()


def test_a_saved_directory_gets_the_mode_save_pretrained_gives(tmp_path, tiny_llama_fp16):
    saved = dtypelint.save_fixed(tiny_llama_fp16, tmp_path / "fixed", EMPTY_PLAN)
    umask = os.umask(0o022)
    os.umask(umask)
    assert saved.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (saved / PLAN_FILE).stat().st_mode & 0o777 == 0o666 & ~umask


def _save_then(tmp_path: Path, model: nn.Module, change: str) -> Path:
    """A directory an earlier save wrote, then touched by its owner as ``change`` says."""
    saved = dtypelint.save_fixed(model, tmp_path / "fixed", EMPTY_PLAN)
    if change == "empty plan":
        (saved / PLAN_FILE).write_text("{}")
        (saved / "thesis.tex").write_text("four years of work")
    elif change == "added file":
        (saved / "thesis.tex").write_text("four years of work")
    elif change == "added folder":
        (saved / "notes").mkdir()
        (saved / "notes" / "todo.txt").write_text("call mum")
    elif change == "edited file":
        (saved / "config.json").write_text((saved / "config.json").read_text().replace("{", '{"edited": 1, ', 1))
    elif change == "symlink":
        (saved / "link").symlink_to(tmp_path)
    elif change == "plan is a directory":
        (saved / PLAN_FILE).unlink()
        (saved / PLAN_FILE).mkdir()
    return saved


FORCE_REFUSALS = [
    ("empty plan", "does not list the files a save wrote"),
    ("added file", "no save wrote thesis.tex"),
    ("added folder", "no save wrote notes/todo.txt"),
    ("edited file", "config.json changed after the save wrote it"),
    ("symlink", "no save wrote link"),
    ("plan is a directory", f"holds no {PLAN_FILE}"),
]


@pytest.mark.parametrize(("change", "message"), FORCE_REFUSALS)
def test_force_removes_nothing_a_save_did_not_write(tmp_path, tiny_llama_fp16, tiny_llama_path, capsys,
                                                    change, message):
    saved = _save_then(tmp_path, tiny_llama_fp16, change)
    before = tree(saved)
    with pytest.raises(UsageError, match=message):
        dtypelint.save_fixed(tiny_llama_fp16, saved, EMPTY_PLAN, force=True)
    capsys.readouterr()  # the first save's progress bar
    code = main(["check", str(tiny_llama_path), "--dtype", "float16", "--fix", "--save-fixed", str(saved), "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert tree(saved) == before


# The files the command writes besides --save-fixed, each aimed at the source checkpoint (or through a
# symlink to it): every one refused before the audit, whatever the mode.
WRITE_TARGETS = [
    ["--diff", "--write-plan", "{src}/model.safetensors"],
    ["--write-plan", "{src}/config.json"],
    ["--graph", "{src}/config.json"],
    ["--graph", "{link}/model.graphml"],
    ["--fix", "--unsafe-fixes", "--write-plan", "{link}/fixes.json"],
    ["--graph", "{src}/new-graph.json"],
]


@pytest.mark.parametrize("options", WRITE_TARGETS, ids=lambda options: " ".join(options))
def test_no_output_lands_in_the_source_checkpoint(workspace, capsys, options):
    source = workspace / "parent" / "src"
    options = [option.format(src=source, link=workspace / "link-to-src") for option in options]
    before = tree(source)
    code = main(["check", str(source), "--dtype", "float16", "--backend", "ipex-llm-xpu", *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "inside its source checkpoint" in err[0], err
    assert tree(source) == before


def test_api_writers_take_the_same_guard(workspace, tiny_llama_fp16):
    source = workspace / "parent" / "src"
    before = tree(source)
    report = dtypelint.audit(tiny_llama_fp16, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    with pytest.raises(UsageError, match="inside its source checkpoint"):
        write_graph(report.graph, source / "config.json", sources=[source])
    with pytest.raises(UsageError, match="inside its source checkpoint"):
        EMPTY_PLAN.write(source / "model.safetensors", sources=[source])
    assert tree(source) == before


def _run_cli(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The command in a process of its own, so that a hang fails the test instead of blocking the run."""
    return subprocess.run([sys.executable, "-m", "dtypelint.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("option", ["--graph", "--write-plan"])
def test_an_output_that_is_a_fifo_is_refused_not_waited_on(workspace, option):
    fifo = workspace / "out.json"
    os.mkfifo(fifo)
    result = _run_cli(["check", "parent/src", "--dtype", "float16", "-q", option, str(fifo),
                       *(["--diff"] if option == "--write-plan" else [])], cwd=workspace)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1 and "is a FIFO; dtypelint writes regular files only" in err[0]


def test_an_output_written_over_keeps_its_mode(tmp_path):
    target = tmp_path / "fixes.json"
    target.write_text("the old plan")
    target.chmod(0o640)
    EMPTY_PLAN.write(target)
    assert target.stat().st_mode & 0o777 == 0o640 and dtypelint.FixPlan.read(target).changes == []


def _disk_full(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_keeps_the_old_file_and_is_one_line(tmp_path, tiny_llama_path, monkeypatch, capsys):
    target = tmp_path / "fixes.json"
    target.write_text("the old plan")
    monkeypatch.setattr("dtypelint.paths.os.fsync", _disk_full)
    with pytest.raises(dtypelint.errors.WriteError, match="No space left on device"):
        EMPTY_PLAN.write(target)
    code = main(["check", str(tiny_llama_path), "--dtype", "float16", "--backend", "ipex-llm-xpu", "--fix",
                 "--unsafe-fixes", "--write-plan", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "the fix plan" in err[0] and "No space left on device" in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["fixes.json"] and target.read_text() == "the old plan"


@pytest.mark.parametrize(
    ("target", "message"),
    [("/proc/nope/out", "is not a writable directory"), ("{file}/out", "is not a writable directory")],
)
def test_unwritable_targets_are_refused_before_loading(tmp_path, tiny_llama_path, capsys, target, message):
    (tmp_path / "file").write_text("")
    target = target.format(file=tmp_path / "file")
    code = main(["check", str(tiny_llama_path), "--fix", "--save-fixed", target])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_nothing_to_fix_saves_nothing_and_says_so(tmp_path, tiny_llama_path, capsys):
    target = tmp_path / "fixed"
    assert main(["check", str(tiny_llama_path), "--dtype", "float16", "--fix", "--save-fixed", str(target)]) == 0
    assert f"nothing saved: no fix was applied, so {target} was not written" in capsys.readouterr().out
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_model_without_save_pretrained_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "unsaveable_entry.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 8).half(), nn.Linear(8, 4))  # the head stayed float32
            return model, torch.randn(2, 8, dtype=torch.float16)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["check", "--entry", "unsaveable_entry:build", "--fix", "--save-fixed", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Sequential has no save_pretrained" in err[0], err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="has no save_pretrained"):
        dtypelint.save_fixed(nn.Linear(2, 2), tmp_path / "out", EMPTY_PLAN)


class SlowSave(nn.Module):
    """A model whose ``save_pretrained`` writes part of a checkpoint, then blocks or is interrupted."""

    def __init__(self, then: str) -> None:
        super().__init__()
        self.then = then

    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / "model.safetensors").write_bytes(b"\0" * 1024)
        if self.then == "interrupt":
            raise KeyboardInterrupt
        time.sleep(60)


class QuickSave(nn.Module):
    def save_pretrained(self, directory: Path) -> None:
        torch.save({}, Path(directory) / "pytorch_model.bin")


def test_ctrl_c_during_a_save_leaves_nothing_behind(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        dtypelint.save_fixed(SlowSave("interrupt"), tmp_path / "fixed", EMPTY_PLAN)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_save_is_cleaned_up_by_the_next_one_which_says_so(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import dtypelint
        from test_data_loss import EMPTY_PLAN, SlowSave
        dtypelint.save_fixed(SlowSave("block"), {str(tmp_path / "fixed")!r}, EMPTY_PLAN)
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".fixed.dtypelint-staging.*/model.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stale = list(tmp_path.glob(".fixed.dtypelint-staging.*"))
    assert len(stale) == 1  # what a killed save leaves

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dtypelint.save_fixed(QuickSave(), tmp_path / "other", EMPTY_PLAN)
    assert not stale[0].exists()
    assert [str(w.message) for w in caught] == [
        f"removed 1 staging directory left by an interrupted save: {stale[0].name}"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
