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


class Squares(torch.nn.Module):
    def forward(self, x):
        return torch.mul(x, x) + 1  # one tensor passed twice: a digraph has one edge for it


def test_rules_answer_from_links_and_networkx_edges_are_made_on_first_use(stray_fp32_layer):
    report = dtypelint.audit(stray_fp32_layer, torch.randn(2, 16, dtype=torch.float16))
    graph = report.graph
    assert report.findings and "_succ" not in vars(graph)  # the rules ran without networkx's edge dicts
    assert graph.number_of_edges() == sum(len(graph.inputs(op)) + len(graph.outputs(op)) for op in graph.ops())
    for op in graph.ops():
        assert list(graph.predecessors(op)) == [tensor for tensor, _ in graph.inputs(op)]
        assert [graph.edges[tensor, op]["arg"] for tensor, _ in graph.inputs(op)] == [arg for _, arg in graph.inputs(op)]
        assert list(graph.successors(op)) == graph.outputs(op)
    for tensor in graph.tensors():
        assert list(graph.successors(tensor)) == graph.consumers(tensor)
        assert next(graph.predecessors(tensor), None) == graph.producer(tensor)
    copy = graph.copy()
    (conflict,) = graph.dtype_conflicts()
    for tensor in graph.floating_inputs(conflict):
        copy.nodes[tensor]["dtype"] = "float16"
    assert [copy.inputs(op) for op in copy.ops()] == [graph.inputs(op) for op in graph.ops()]  # argument order
    assert list(copy.edges(data=True)) == list(graph.edges(data=True))
    assert list(graph.dtype_conflicts()) == [conflict] and not list(copy.dtype_conflicts())  # its own node dicts
    around = graph.neighbourhood(graph.inputs(graph.failed_op())[0][0])
    assert all(around.inputs(op) == [pair for pair in graph.inputs(op) if pair[0] in around] for op in around.ops())


def test_a_tensor_passed_twice_is_one_input_as_one_edge():
    graph = dtypelint.trace(Squares(), torch.randn(3))
    (mul,) = [op for op in graph.ops() if graph.op(op)["name"] == "aten.mul"]
    (square,) = graph.outputs(mul)
    assert graph.inputs(mul) == [(graph.find_tensor("x"), "1")]  # the last argument that passed it
    assert graph.consumers(graph.find_tensor("x")) == [mul] and graph.producer(square) == mul
    assert graph.number_of_edges() == 4  # x -> mul -> square -> add -> out


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
