"""Graph queries and exports."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import networkx as nx
import pytest
import torch

import dtypelint
from dtypelint import UsageError
from dtypelint.drawing import to_mermaid, write_graph


@pytest.fixture
def failing_graph(stray_fp32_layer):
    return dtypelint.trace(stray_fp32_layer, torch.randn(2, 16, dtype=torch.float16))


def test_graph_is_a_networkx_digraph_in_data_flow_order(failing_graph):
    assert isinstance(failing_graph, nx.DiGraph)
    assert nx.is_directed_acyclic_graph(failing_graph)
    indices = [failing_graph.nodes[op]["index"] for op in failing_graph.ops()]
    assert indices == sorted(indices)
    for source, target in failing_graph.edges:
        assert failing_graph.nodes[source]["kind"] != failing_graph.nodes[target]["kind"]


def test_conflicts_ancestry_and_neighbourhood(failing_graph):
    conflicts = list(failing_graph.dtype_conflicts())
    assert len(conflicts) == 1
    op = conflicts[0]
    leaves = {failing_graph.nodes[t]["name"] for t in failing_graph.leaves(failing_graph.inputs(op)[1][0])}
    assert {"x", "body.0.weight", "body.2.weight"} <= leaves
    around = failing_graph.neighbourhood(op, radius=3)  # weight -> t -> view -> addmm
    assert op in around and failing_graph.find_tensor("head.weight") in around
    assert around.number_of_nodes() < failing_graph.number_of_nodes()


@pytest.mark.parametrize("suffix", [".json", ".graphml", ".dot", ".mmd"])
def test_exports_round_trip_their_format(failing_graph, tmp_path, suffix):
    path = write_graph(failing_graph, tmp_path / f"graph{suffix}")
    text = path.read_text()
    if suffix == ".json":
        loaded = nx.node_link_graph(json.loads(text), edges="edges")
        assert loaded.number_of_nodes() == failing_graph.number_of_nodes()
        assert loaded.nodes[failing_graph.find_tensor("head.weight")]["dtype"] == "float32"
    elif suffix == ".graphml":
        ElementTree.fromstring(text)
        loaded = nx.read_graphml(path)
        assert loaded.number_of_edges() == failing_graph.number_of_edges()
    elif suffix == ".dot":
        assert text.startswith("digraph") and text.count("->") == failing_graph.number_of_edges()
    else:
        assert text.startswith("flowchart TD") and "head.weight float32[4, 16]" in text


def test_mermaid_of_a_subgraph_marks_the_failing_op(failing_graph):
    op = next(op for op in failing_graph.ops() if failing_graph.nodes[op]["failed"])
    text = to_mermaid(failing_graph, failing_graph.neighbourhood(op, 1))
    assert f"style {op} stroke:#d00" in text
    assert text.count("-->") == failing_graph.neighbourhood(op, 1).number_of_edges()


def test_unknown_export_format_is_a_usage_error(failing_graph, tmp_path):
    with pytest.raises(UsageError, match="use .json"):
        write_graph(failing_graph, tmp_path / "graph.png")
