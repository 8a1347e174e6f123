"""Helpers the tests import (``from helpers import ...``): not in conftest.py, whose module name is shared
with tests/ipex/conftest.py, so that one pytest run can collect both folders."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY_LLAMA = EXAMPLES / "tiny-llama"


def snapshot(model: nn.Module) -> dict:
    """Everything an audit must leave as it was."""
    return {
        "state": {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()},
        "params": {name: (p.dtype, p.requires_grad, type(p)) for name, p in model.named_parameters()},
        "buffers": {name: b.dtype for name, b in model.named_buffers()},
        "persistent": {name: sorted(m._non_persistent_buffers_set) for name, m in model.named_modules()},
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()
        ],
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["params"] == before["params"]
    assert after["buffers"] == before["buffers"]
    assert after["persistent"] == before["persistent"]
    assert after["hooks"] == before["hooks"]
    assert after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name
    hooks = torch.nn.modules.module
    assert not hooks._global_forward_hooks and not hooks._global_forward_pre_hooks


def per_layer_rotary(model: nn.Module) -> nn.Module:
    """The per-layer rotary layout ipex-llm pins (transformers 4.37), grafted onto a transformers 5 Llama:
    a copy of the model-level rotary module (float32 ``inv_freq``) in each attention layer."""
    for layer in model.model.layers:
        layer.self_attn.rotary_emb = copy.deepcopy(model.model.rotary_emb)
    return model


class StrayFp32Layer(nn.Module):
    """An fp16 MLP whose head was (re)created after ``.half()``: float32."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).half()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(kind: str) -> list[str]:
    """The README's Python blocks marked ``<!-- readme-test: KIND -->`` (``.venv``, ``.venv-ipex``,
    ``pytest``): where each one is meant to run."""
    import re

    return re.findall(rf"<!-- readme-test: {re.escape(kind)} -->\n```python\n(.*?)```", README.read_text(), re.S)


def run_readme_block(block: str, workdir: Path) -> None:
    """Run a README block as written, from a directory holding a copy of the examples (it writes files)."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(EXAMPLES / "tiny-llama", workdir / "examples" / "tiny-llama")
    shutil.copytree(EXAMPLES / "configs", workdir / "examples" / "configs")
    result = subprocess.run([sys.executable, "-c", block], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
