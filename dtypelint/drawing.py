"""What the report drawings show: where each error is in the dtype graph, and the path from its root
cause to it. Shared by the Markdown and HTML formats; the drawing itself is Mermaid's.

A root cause is where the odd dtype enters the flow: a leaf (parameter, buffer, attribute, input,
constant) or a cast (an op whose output dtype is not the dtype of any of its floating inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dtypelint.vocabulary import OpKind

if TYPE_CHECKING:
    from dtypelint.diagnostics import Finding
    from dtypelint.graph import DtypeGraph
    from dtypelint.report import Report

MAX_DRAWINGS = 10  # drawings per report
MAX_PATH_NODES = 40  # nodes per drawing: a path through a whole model would not read


@dataclass
class CausePath:
    """The nodes to draw for an error at ``site`` (an op, or a tensor a contract names), and the ones to
    highlight: ``conflict`` (the site) and ``culprits`` (odd-dtype operands and the paths to their roots)."""

    site: str
    nodes: set[str] = field(default_factory=set)
    culprits: set[str] = field(default_factory=set)
    roots: list[str] = field(default_factory=list)
    trimmed: bool = False

    def classes(self) -> dict[str, str]:
        """Mermaid classes (``DtypeGraph.to_mermaid``) of the highlighted nodes."""
        return {**dict.fromkeys(self.culprits, "culprit"), self.site: "conflict"}


def error_sites(report: Report) -> dict[str, list[Finding]]:
    """The errors that name a graph node, grouped by node in report order."""
    sites: dict[str, list[Finding]] = {}
    for finding in report.errors:
        if finding.node is not None and finding.node in report.graph:
            sites.setdefault(finding.node, []).append(finding)
    return sites


def unplaced_errors(report: Report) -> list[Finding]:
    """The errors that name no graph node: a contract on a tensor the traced forward never read (a
    per-layer rotary ``inv_freq`` whose cos/sin were cached at load) has nothing to draw."""
    return [finding for finding in report.errors if finding.node is None or finding.node not in report.graph]


def cause_path(graph: DtypeGraph, site: str, compute_dtype: str, *, max_nodes: int = MAX_PATH_NODES) -> CausePath:
    """The odd-dtype operands of ``site`` followed back to their roots, the other operands with the op
    that made them (context, not followed), and the site's outputs."""
    path = CausePath(site, nodes={site})
    if graph.nodes[site]["kind"] == "tensor":
        _follow_back(graph, site, path, max_nodes)
        return path
    operands = graph.floating_inputs(site)
    expected = _expected_dtype(graph, operands, compute_dtype)
    for operand in operands:
        if graph.tensor(operand)["dtype"] != expected:
            _follow_back(graph, operand, path, max_nodes)
    for operand in operands:
        if graph.tensor(operand)["dtype"] == expected:
            _add_context(graph, operand, path, max_nodes)
    for output in graph.outputs(site):
        _add(path, max_nodes, output)
    return path


def _expected_dtype(graph: DtypeGraph, operands: list[str], compute_dtype: str) -> str:
    """The dtype the operands should share: the compute dtype where one has it, else the most common
    (as DT101 decides)."""
    dtypes = [graph.tensor(operand)["dtype"] for operand in operands]
    if compute_dtype in dtypes or not dtypes:
        return compute_dtype
    return max(dtypes, key=dtypes.count)


def _follow_back(graph: DtypeGraph, operand: str, path: CausePath, max_nodes: int) -> None:
    """Breadth first from an odd-dtype operand through the ops that kept its dtype, up to its roots."""
    frontier = [operand]
    _add(path, max_nodes, operand, culprit=True)
    while frontier:
        tensor = frontier.pop(0)
        producer = graph.producer(tensor)
        if producer is None:
            path.roots.append(tensor)
            continue
        if not _add(path, max_nodes, producer, culprit=True):
            return
        dtype = graph.tensor(tensor)["dtype"]
        kept = [source for source, _ in graph.inputs(producer) if graph.tensor(source)["dtype"] == dtype]
        if graph.op_is(producer, OpKind.CAST) or not kept:
            path.roots.append(producer)  # the cast: draw what it cast from, and stop
            for source, _ in graph.inputs(producer):
                _add(path, max_nodes, source)
            continue
        for source in kept:
            if source not in path.nodes and _add(path, max_nodes, source, culprit=True):
                frontier.append(source)


def _add_context(graph: DtypeGraph, operand: str, path: CausePath, max_nodes: int) -> None:
    if _add(path, max_nodes, operand) and (producer := graph.producer(operand)) is not None:
        _add(path, max_nodes, producer)


def _add(path: CausePath, max_nodes: int, node: str, *, culprit: bool = False) -> bool:
    """Add a node unless the drawing is full (then mark it trimmed); False when it did not fit."""
    if node not in path.nodes and len(path.nodes) >= max_nodes:
        path.trimmed = True
        return False
    path.nodes.add(node)
    if culprit:
        path.culprits.add(node)
    return True
