"""Attacks on the user's files: a fixed checkpoint never lands on, in or around its source, ``--force``
never deletes what an earlier save did not write, and nothing half-written stays behind."""

from __future__ import annotations

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
    with pytest.raises(UsageError, match=f"holds {PLAN_FILE}"):
        dtypelint.save_fixed(tiny_llama_fp16, unrelated, EMPTY_PLAN, force=True)
    assert tree(unrelated) == {"table.csv": b"a,b\n"}
    saved = dtypelint.save_fixed(tiny_llama_fp16, tmp_path / "fixed", EMPTY_PLAN)
    (saved / "stale.txt").write_text("from the earlier save")
    assert dtypelint.save_fixed(tiny_llama_fp16, saved, EMPTY_PLAN, force=True) == saved
    assert (saved / PLAN_FILE).is_file() and not (saved / "stale.txt").exists()


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
