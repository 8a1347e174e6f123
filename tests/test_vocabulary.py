"""The op and origin vocabulary: keyed on aten packets, shared by the graph and every rule."""

from __future__ import annotations

import json

import torch
from torch import nn

import dtypelint
from dtypelint.drawing import write_graph
from dtypelint.vocabulary import OpKind, OriginKind, kinds_of, packets

aten = torch.ops.aten


def test_kinds_are_keyed_on_aten_packets():
    assert kinds_of(aten.addmm) == {OpKind.ONE_DTYPE}
    assert {OpKind.ONE_DTYPE, OpKind.ATTENTION} <= kinds_of(aten._scaled_dot_product_flash_attention_for_cpu)
    assert {OpKind.COPIES_VALUES, OpKind.CONCATENATES} <= kinds_of(aten.cat)
    assert kinds_of(aten.relu) == frozenset()
    assert aten._to_copy in packets(OpKind.CAST) and aten.masked_fill in packets(OpKind.FILL)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("scale", torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) * self.scale
        q = h.view(1, 2, 2, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_the_graph_answers_in_the_vocabulary_and_exports_plain_strings(tmp_path):
    graph = dtypelint.trace(Attention(), torch.randn(1, 2, 8))
    attention = [op for op in graph.ops() if graph.op_is(op, OpKind.ATTENTION)]
    assert len(attention) == 1 and graph.op_is(attention[0], OpKind.ONE_DTYPE)
    origins = {graph.tensor(node)["origin"] for node in graph.tensors()}
    assert {OriginKind.PARAMETER, OriginKind.BUFFER, OriginKind.INPUT, OriginKind.OP} <= origins
    data = json.loads(write_graph(graph, tmp_path / "g.json").read_text())
    assert all("packet" not in node for node in data["nodes"])
    assert {node["origin"] for node in data["nodes"] if node["kind"] == "tensor"} >= {"parameter", "buffer", "input"}
    write_graph(graph, tmp_path / "g.graphml")  # GraphML takes only plain scalars
