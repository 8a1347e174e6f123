"""Drawings of the dtype graph, a pass over it as torch.fx draws its graphs: Mermaid and DOT export, and
which nodes the drawing of each error shows (the path from its root cause to it). The Markdown and HTML
formats draw errors with it; ``write_graph`` writes the whole graph (``--graph``).

A root cause is where the odd dtype enters the flow: a leaf (parameter, buffer, attribute, input,
constant) or a cast (an op whose output dtype is not the dtype of any of its floating inputs).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dtypelint.diagnostics import ROOT_LOCATION
from dtypelint.graph import node_order
from dtypelint.paths import unsupported_graph_suffix, write_file
from dtypelint.vocabulary import OpKind

if TYPE_CHECKING:
    from dtypelint.diagnostics import Finding
    from dtypelint.graph import DtypeGraph
    from dtypelint.report import Report

MAX_DRAWINGS = 10  # drawings per report
MAX_PATH_NODES = 40  # nodes per drawing: a path through a whole model would not read
# Drawings keep names to about this many characters (tables and the JSON/GraphML ``label`` keep them whole).
DRAWING_NAME_WIDTH = 60
MERMAID_CLASSES = {
    "conflict": "fill:#fde2e1,stroke:#c62828,stroke-width:3px",  # the op that fails or gets mixed dtypes
    "culprit": "fill:#fff3cd,stroke:#e65100,stroke-width:3px",  # the odd-dtype operand and where it comes from
}


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
        """Mermaid classes (``to_mermaid``) of the highlighted nodes."""
        return {**dict.fromkeys(self.culprits, "culprit"), self.site: "conflict"}


@dataclass(frozen=True)
class ErrorDrawing:
    """The drawing of one error site: the codes found there, the module, the labels of the site and of
    its root causes, and the path drawn, as Mermaid source with the site and the culprits highlighted."""

    codes: str
    location: str
    site: str
    roots: list[str]
    path: CausePath
    mermaid: str


@dataclass(frozen=True)
class ContractDrawing:
    """A kernel contract broken by a tensor the traced forward never used (a per-layer rotary ``inv_freq``
    whose cos/sin were cached while the model was built): the contract itself, the tensor and the operands
    it must match meeting at the kernel the backend substitutes."""

    codes: str
    location: str
    kernel: str
    mermaid: str


@dataclass(frozen=True)
class ErrorDrawings:
    """What a report draws: up to ``MAX_DRAWINGS`` error sites, how many more there were, the contracts
    broken by tensors the traced forward never used, and the other errors that name nothing it used."""

    drawn: list[ErrorDrawing]
    more: int
    unplaced: list[Finding]
    contracts: list[ContractDrawing] = field(default_factory=list)


def error_drawings(report: Report, *, max_drawings: int = MAX_DRAWINGS) -> ErrorDrawings:
    """The one selection of what the formats draw: each error site (errors grouped by the graph node they
    name, in report order) with the path from its root cause."""
    graph = report.graph
    sites: dict[str, list[Finding]] = {}
    unplaced = []
    for finding in report.errors:
        if finding.node is not None and finding.node in graph:
            sites.setdefault(finding.node, []).append(finding)
        else:
            unplaced.append(finding)
    drawn = []
    for node, findings in list(sites.items())[:max_drawings]:
        path = cause_path(graph, node, report.compute_dtype)
        drawn.append(ErrorDrawing(
            codes=", ".join(dict.fromkeys(finding.code for finding in findings)),
            location=findings[0].location or ROOT_LOCATION,
            site=graph.label(node),
            roots=[graph.label(root) for root in path.roots],
            path=path,
            mermaid=to_mermaid(graph, path.nodes, classes=path.classes()),
        ))
    broken = [finding for finding in unplaced if finding.pack and finding.tensor and finding.op][:max_drawings]
    contracts = [contract_drawing(finding, report.compute_dtype, report.tensor_dtypes.get(finding.tensor or ""))
                 for finding in broken]
    return ErrorDrawings(drawn, max(len(sites) - max_drawings, 0),
                         [finding for finding in unplaced if all(finding is not other for other in broken)], contracts)


def contract_drawing(finding: Finding, compute_dtype: str, tensor_dtype: str | None) -> ContractDrawing:
    """The broken contract of a kernel-contract finding: its tensor (in its dtype) and the operands it must
    match (the pack's ``must-match-label``: "query/key") flowing into the kernel."""
    odd = tensor_dtype or next((dtype for dtype in finding.dtypes if dtype != compute_dtype), compute_dtype)
    others = next((dtype for dtype in finding.dtypes if dtype != odd), compute_dtype)
    operands = _must_match(finding) or "the operands it must match"
    lines = ["flowchart LR", *(f"    classDef {name} {style}" for name, style in MERMAID_CLASSES.items()),
             f'    tensor("{mermaid_text(f"{finding.tensor} {odd}")}"):::culprit',
             f'    operands("{mermaid_text(f"{operands} {others}")}")',
             f'    kernel["{mermaid_text(f"{finding.op} ({finding.pack} kernel)")}"]:::conflict',
             f'    tensor -->|"{odd}"| kernel', f'    operands -->|"{others}"| kernel']
    return ContractDrawing(finding.code, finding.location or ROOT_LOCATION, finding.op or "", "\n".join(lines) + "\n")


def _must_match(finding: Finding) -> str | None:
    """What the contract's tensor must match, in the pack's words without "dtype" ("query/key")."""
    from dtypelint.errors import DtypelintError
    from dtypelint.packs.schema import load_pack

    try:
        contract = next((c for c in load_pack(finding.pack or "").contracts if c.code == finding.code), None)
    except DtypelintError:  # a pack file that moved since the audit: drawn without the label
        return None
    label = contract.must_match_label if contract is not None else ""
    return label.removesuffix(" dtype") or None


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


# Export ----------------------------------------------------------------------------------------------


def to_mermaid(graph: DtypeGraph, nodes: Iterable[str] | None = None, *, classes: Mapping[str, str] | None = None) -> str:
    """A Mermaid flowchart of the given nodes (all when None): ops are boxes, tensors rounded, edges
    labelled with the dtype that flows. ``classes`` maps nodes to a class of ``MERMAID_CLASSES``
    (``conflict``, ``culprit``) that highlights them; the op where the forward raised is outlined."""
    chosen = graph if nodes is None else graph.subgraph(nodes)
    classes = classes or {}
    lines = ["flowchart TD"]
    lines += [f"    classDef {name} {style}" for name, style in MERMAID_CLASSES.items() if name in classes.values()]
    for node in sorted(chosen, key=node_order):  # a subgraph's order is a set's: sorted, drawings stay put
        data = chosen.nodes[node]
        text = mermaid_text(graph.label(node, DRAWING_NAME_WIDTH))
        shape = f'["{text}"]' if data["kind"] == "op" else f'("{text}")'
        style = f":::{classes[node]}" if node in classes else ""
        lines.append(f"    {node}{shape}{style}")
        if data.get("failed"):
            lines.append(f"    style {node} stroke:#d00,stroke-width:3px")
    lines += [f'    {source} -->|"{mermaid_text(graph.flow_label(source, target))}"| {target}'
              for source, target in sorted(chosen.edges, key=lambda edge: tuple(map(node_order, edge)))]
    return "\n".join(lines) + "\n"


def to_dot(graph: DtypeGraph) -> str:
    """The whole graph in Graphviz DOT: ops are boxes, tensors ellipses, edges labelled with their dtype."""
    lines = ["digraph dtypes {", "  rankdir=TB;"]
    for node, data in graph.nodes(data=True):
        shape = "box" if data["kind"] == "op" else "ellipse"
        lines.append(f"  {node} [shape={shape}, label={dot_string(graph.label(node, DRAWING_NAME_WIDTH))}];")
    lines += [f"  {source} -> {target} [label={dot_string(graph.flow_label(source, target))}];"
              for source, target in graph.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph(graph: DtypeGraph, path: str | Path, *, sources: Sequence[str | Path] = ()) -> Path:
    """Write the graph in the format its extension names: data (.json node-link, .graphml) or a drawing
    (.dot/.gv, .mmd/.mermaid), whole or not at all, never on, in or around ``sources`` (checkpoints:
    ``dtypelint.paths.write_file``)."""
    suffix = Path(path).suffix.lower()
    text: str | bytes
    if suffix == ".json":
        text = json.dumps(graph.to_node_link(), indent=1)
    elif suffix == ".graphml":
        text = graph.to_graphml()
    elif suffix in (".dot", ".gv"):
        text = to_dot(graph)
    elif suffix in (".mmd", ".mermaid"):
        text = to_mermaid(graph)
    else:
        raise unsupported_graph_suffix(suffix)
    return write_file("the graph", path, text, sources)


# Mermaid reads ``#code;`` as that character. Inside a quoted label only these need it: ``"`` ends the
# label, ``#`` starts a code, ``&<>`` would be markup in HTML labels, a leading backtick a Markdown string.
_MERMAID_ESCAPES = {ord(char): f"#{ord(char)};" for char in '"#&<>`'}


def mermaid_text(text: str) -> str:
    """``text`` safe inside a quoted Mermaid label: one line, quotes, codes and markup encoded."""
    return " ".join(text.split()).translate(_MERMAID_ESCAPES)


def dot_string(text: str) -> str:
    """``text`` as a quoted DOT string: ``\\"`` is DOT's only escape, and a backslash stays a backslash
    in a label only doubled (``\\n``, ``\\N`` are label escapes). Labels are printable: no newline."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
