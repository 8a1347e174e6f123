"""A checkpoint of mixed stored dtypes (a float32 ``ln_f`` in a float16 GPT-2): ``from_pretrained`` casts it on
load, so the forward dtypelint traces is clean, but a loader that keeps stored dtypes runs the norm in float32
and CUDA's layer_norm rejects that. The report says so in one note; a uniform checkpoint gets none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dtypelint.cli import main

NORM = "transformer.ln_f"


def _gpt2(directory: Path, *, float32_norm: bool) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).half()
    if float32_norm:
        model.transformer.ln_f.float()  # saved as it is: two float32 tensors in a float16 checkpoint
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return _gpt2(tmp_path_factory.mktemp("mixed"), float32_norm=True)


def _notes(capsys, *arguments: str) -> list[str]:
    assert main(["check", *arguments, "--dtype", "float16", "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)["notes"]


@pytest.mark.parametrize("mode", ["value", "meta"])
def test_tensors_stored_in_another_dtype_are_named_with_what_the_backend_does_with_them(mixed, capsys, mode):
    [note] = [note for note in _notes(capsys, str(mixed), "--backend", "cuda", "--mode", mode) if "stores" in note]
    assert note.startswith("the checkpoint stores 2 tensors in another dtype than the audit ran (float16")
    assert f"{NORM}.weight float32" in note and f"{NORM}.bias float32" in note
    assert f"under cuda that is CUDA101 at {NORM}" in note  # layer_norm with a float32 weight raises on CUDA


def test_without_a_backend_contract_the_note_names_the_tensors_only(mixed, capsys):
    [note] = [note for note in _notes(capsys, str(mixed)) if "stores" in note]
    assert f"{NORM}.weight float32" in note and "under" not in note


def test_a_checkpoint_of_one_stored_dtype_gets_no_note_whatever_dtype_the_audit_runs(tmp_path, capsys):
    uniform = _gpt2(tmp_path / "uniform", float32_norm=False)
    assert not [note for note in _notes(capsys, str(uniform), "--backend", "cuda") if "stores" in note]
    assert main(["check", str(uniform), "--dtype", "float32", "--format", "json"]) == 0
    assert not [note for note in json.loads(capsys.readouterr().out)["notes"] if "stores" in note]
