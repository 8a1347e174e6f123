"""Stage 3 of the pipeline: the dtype graph built from a trace.

``DtypeGraph`` *is* a ``networkx.DiGraph``. Op nodes (``op0``, ``op1``, ... in execution order) and
tensor nodes (``t0``, ``t1``, ...) alternate: an edge ``tensor -> op`` is an input (attribute ``arg``,
the argument position or keyword), an edge ``op -> tensor`` an output. An in-place op produces a new
version of the tensor it mutates, so the graph stays acyclic.

Op node attributes: ``kind="op"``, ``index``, ``target`` (``aten.mm.default``), ``name`` (``aten.mm``),
``module`` (state-dict path of the module that ran it, ``""`` for the root), ``inplace``, ``failed``.
Tensor node attributes: ``kind="tensor"``, ``dtype`` (``"float16"``), ``shape`` (tuple), ``device``,
``origin`` (``parameter`` | ``buffer`` | ``attribute`` | ``input`` | ``constant`` | ``op``), ``name``
(qualified name of a leaf), and in value mode with statistics ``min``/``max``. Exports add ``label``
(``DtypeGraph.label``: the tensor's name or producer, dtype and shape) and draw edges with their dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypedDict

import networkx as nx
import torch
from torch._ops import OpOverloadPacket

from dtypelint.dtypes import dtype_name
from dtypelint.paths import unsupported_graph_suffix
from dtypelint.trace import Origin, TensorRecord, Tracer, TraceResult
from dtypelint.vocabulary import LEAF_ORIGINS, OpKind, OriginKind, kinds_of

_PRODUCED = Origin(OriginKind.OP)
_DTYPES = {dtype_name(dtype): dtype for dtype in vars(torch).values() if isinstance(dtype, torch.dtype)}


class OpNode(TypedDict):
    kind: str
    index: int
    target: str
    name: str
    packet: OpOverloadPacket  # the vocabulary's key; not exported
    module: str
    inplace: bool
    failed: bool


class TensorNode(TypedDict, total=False):
    kind: str
    dtype: str
    shape: tuple[int, ...]
    device: str
    origin: OriginKind
    name: str | None
    min: float  # value mode with statistics only
    max: float


class DtypeGraph(nx.DiGraph):
    """A networkx digraph of ops and tensors with the queries the rules need."""

    @classmethod
    def from_tracer(cls, tracer: Tracer, error: BaseException | None = None) -> DtypeGraph:
        """The graph of whatever ran inside ``with Tracer(model):`` (``error``: what it raised, if it did)."""
        return cls.from_trace(TraceResult(tracer, error))

    @classmethod
    def from_trace(cls, result: TraceResult) -> DtypeGraph:
        tracer = result.tracer
        graph = cls()
        graph.graph.update(
            model=tracer.model_info.class_name,
            mode="meta" if result.fake else "value",
            stats=any(tensor.stats is not None for tensor in tracer.tensors),
            error=None if result.error is None else f"{type(result.error).__name__}: {result.error}",
            ops_run=tracer.ops_run,
            ops_recorded=len(tracer.records),
            autocast=tracer.autocast,
            attention_calls=tuple(tracer.attention.calls),  # dtypelint.attention.AttentionCall; not exported
        )
        graph.add_nodes_from(
            (f"t{index}", _tensor_attributes(tensor)) for index, tensor in enumerate(tracer.tensors)
        )
        ops, edges = [], []
        for index, record in enumerate(tracer.records):
            target = str(record.func)
            op = f"op{index}"
            name = target.rsplit(".", 1)[0] if target.count(".") > 1 else target
            attributes = dict(
                kind="op",
                index=index,
                target=target,
                name=name,
                packet=record.func.overloadpacket,
                module=record.module,
                inplace=record.func._schema.is_mutable,
                failed=not record.completed,
            )
            ops.append((op, attributes))
            edges += [(f"t{tensor}", op, {"arg": argument}) for argument, tensor in record.inputs]
            edges += [(op, f"t{tensor}", {"out": position}) for position, tensor in enumerate(record.outputs or [])]
            if not record.inputs:
                for tensor in record.outputs or []:
                    graph.nodes[f"t{tensor}"].update(origin=OriginKind.CONSTANT, name=name)
        graph.add_nodes_from(ops)
        graph.add_edges_from(edges)
        return graph

    # Queries -------------------------------------------------------------------------------------------

    # The node and adjacency dicts are read directly: these queries run for every op of every rule, and
    # networkx's views cost several times more.
    def op(self, node: str) -> OpNode:
        return self._node[node]  # type: ignore[return-value]

    def tensor(self, node: str) -> TensorNode:
        return self._node[node]  # type: ignore[return-value]

    def op_is(self, op: str, kind: OpKind) -> bool:
        return kind in kinds_of(self._node[op]["packet"])

    def ops(self) -> Iterator[str]:
        """Op nodes in execution order."""
        return (node for node, data in self._node.items() if data["kind"] == "op")

    def tensors(self) -> Iterator[str]:
        return (node for node, data in self._node.items() if data["kind"] == "tensor")

    def failed_op(self) -> str | None:
        """The op at which the forward raised, if it raised inside one."""
        return next((op for op in self.ops() if self.nodes[op]["failed"]), None)

    def inputs(self, op: str) -> list[tuple[str, str]]:
        """``(tensor node, argument)`` pairs of an op, in argument order."""
        return [(source, data["arg"]) for source, data in self._pred[op].items()]

    def outputs(self, op: str) -> list[str]:
        return list(self._succ[op])

    def producer(self, tensor: str) -> str | None:
        return next(iter(self._pred[tensor]), None)

    def consumers(self, tensor: str) -> list[str]:
        return list(self._succ[tensor])

    def dtype(self, tensor: str) -> torch.dtype:
        return _DTYPES[self._node[tensor]["dtype"]]

    def floating_inputs(self, op: str) -> list[str]:
        return [node for node, _ in self.inputs(op) if self.dtype(node).is_floating_point]

    def leaves(self, tensor: str) -> list[str]:
        """Every leaf tensor (parameter, buffer, attribute, input, constant) the tensor derives from."""
        return [
            node
            for node in sorted(nx.ancestors(self, tensor) | {tensor}, key=_node_order)
            if self.nodes[node]["kind"] == "tensor" and self.nodes[node]["origin"] in LEAF_ORIGINS
        ]

    def find_tensor(self, name: str) -> str | None:
        """The leaf node of a named parameter, buffer, attribute or input, if the forward used it."""
        return next((node for node, label in self.nodes(data="name") if label == name), None)

    def source(self, tensor: str, *, through_copies: bool = False) -> str:
        """The tensor this one is a view of, followed back through view ops (and, with
        ``through_copies``, through ops that copy values of their first input: index, gather, ...)."""
        node = tensor
        while (op := self.producer(node)) is not None and self._follows(op, through_copies):
            node = self.inputs(op)[0][0]
        return node

    def _follows(self, op: str, through_copies: bool) -> bool:
        kinds = kinds_of(self._node[op]["packet"])
        if OpKind.VIEW in kinds:
            return True
        return through_copies and OpKind.COPIES_VALUES in kinds and OpKind.CONCATENATES not in kinds

    def describe(self, tensor: str) -> str:
        """A short human label: ``buffer model.rotary_emb.inv_freq`` or ``activation of aten.mul``."""
        source = self.tensor(self.source(tensor))
        if source["origin"] in LEAF_ORIGINS - {OriginKind.CONSTANT}:
            return f"{source['origin']} {source['name']}"
        if source["origin"] == OriginKind.CONSTANT:
            return f"constant from {source['name']}" if source["name"] else "constant"
        op = self.producer(self.source(tensor))
        return f"activation from {self.nodes[op]['name']}" if op else "activation"

    def computes_values(self, op: str) -> bool:
        """False for factories and fills, whose extreme values are chosen on purpose."""
        return bool(self.floating_inputs(op)) and not self.op_is(op, OpKind.FILL)

    def value_range(self, tensor: str) -> tuple[float, float] | None:
        """(min, max) recorded for a tensor; for views and copies (not measured, to save time) the range of
        what they copy: the first input's, or the union of a concatenation's inputs."""
        data = self.tensor(tensor)
        if "min" in data:
            return data["min"], data["max"]
        op = self.producer(tensor)
        if op is None:
            return None
        if self.op_is(op, OpKind.CONCATENATES):
            ranges = [self.value_range(source) for source, _ in self.inputs(op)]
            if any(bounds is None for bounds in ranges):
                return None
            return min(b[0] for b in ranges), max(b[1] for b in ranges)  # type: ignore[index]
        if self._follows(op, through_copies=True):
            return self.value_range(self.inputs(op)[0][0])
        return None

    def dtype_conflicts(self) -> Iterator[str]:
        """Ops (not explicit casts) whose floating tensor inputs have different dtypes."""
        for op in self.ops():
            if self.op_is(op, OpKind.CAST):
                continue
            if len({self.nodes[node]["dtype"] for node in self.floating_inputs(op)}) > 1:
                yield op

    def neighbourhood(self, node: str, radius: int = 2) -> DtypeGraph:
        """The subgraph within ``radius`` edges of ``node``, in either direction."""
        return self.subgraph(nx.ego_graph(self, node, radius=radius, undirected=True)).copy()

    def label(self, node: str, width: int | None = None) -> str:
        """``aten.addmm @ head`` for an op; for a tensor its name and type: a leaf's qualified name
        (``model.rotary_emb.inv_freq float32[16]``), a view's source (``head.weight (view) float32[16, 4]``),
        else its producer (``from aten.mm float16[2, 4]``). ``width``: drawings middle-ellipsize the name to
        about that many characters, keeping both ends (the model's prefix and the tensor's own name)."""
        data = self.nodes[node]
        if data["kind"] == "op":
            where = f" @ {ellipsize(data['module'], width)}" if data["module"] else ""
            return f"{data['name']}{where}"
        return f"{ellipsize(self._tensor_name(node), width)} {data['dtype']}{list(data['shape'])}"

    def _tensor_name(self, tensor: str) -> str:
        data = self.tensor(tensor)
        if data["origin"] in LEAF_ORIGINS and data["name"]:
            return data["name"]
        source = self.tensor(self.source(tensor))
        if source["origin"] in LEAF_ORIGINS and source["name"]:
            return f"{source['name']} (view)"
        producer = self.producer(tensor)
        return f"from {self.op(producer)['name']}" if producer else str(data["origin"])

    def flow_label(self, source: str, target: str) -> str:
        """What flows along an edge: the dtype of its tensor end."""
        tensor = source if self.nodes[source]["kind"] == "tensor" else target
        return self.tensor(tensor)["dtype"]

    # Export --------------------------------------------------------------------------------------------

    def to_node_link(self) -> dict[str, Any]:
        return nx.node_link_data(_export_ready(self), edges="edges")

    def to_mermaid(self, nodes: Iterable[str] | None = None, *, classes: Mapping[str, str] | None = None) -> str:
        """A Mermaid flowchart of the given nodes (all when None): ops are boxes, tensors rounded, edges
        labelled with the dtype that flows. ``classes`` maps nodes to a class of ``MERMAID_CLASSES``
        (``conflict``, ``culprit``) that highlights them; the op where the forward raised is outlined."""
        chosen = self if nodes is None else self.subgraph(nodes)
        classes = classes or {}
        lines = ["flowchart TD"]
        lines += [f"    classDef {name} {style}" for name, style in MERMAID_CLASSES.items()
                  if name in classes.values()]
        for node in sorted(chosen, key=_node_order):  # a subgraph's order is a set's: sorted, drawings stay put
            data = chosen.nodes[node]
            text = mermaid_text(self.label(node, DRAWING_NAME_WIDTH))
            shape = f'["{text}"]' if data["kind"] == "op" else f'("{text}")'
            style = f":::{classes[node]}" if node in classes else ""
            lines.append(f"    {node}{shape}{style}")
            if data.get("failed"):
                lines.append(f"    style {node} stroke:#d00,stroke-width:3px")
        lines += [f'    {source} -->|"{mermaid_text(self.flow_label(source, target))}"| {target}'
                  for source, target in sorted(chosen.edges, key=lambda edge: tuple(map(_node_order, edge)))]
        return "\n".join(lines) + "\n"

    def to_dot(self) -> str:
        lines = ["digraph dtypes {", "  rankdir=TB;"]
        for node, data in self.nodes(data=True):
            shape = "box" if data["kind"] == "op" else "ellipse"
            label = json.dumps(self.label(node, DRAWING_NAME_WIDTH), ensure_ascii=False)
            lines.append(f"  {node} [shape={shape}, label={label}];")
        lines += [f"  {source} -> {target} [label={json.dumps(self.flow_label(source, target))}];"
                  for source, target in self.edges]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> Path:
        """Write the graph in the format named by the extension: .json, .graphml, .dot or .mmd."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            path.write_text(json.dumps(self.to_node_link(), indent=1))
        elif suffix == ".graphml":
            nx.write_graphml(_export_ready(self), path)
        elif suffix in (".dot", ".gv"):
            path.write_text(self.to_dot())
        elif suffix in (".mmd", ".mermaid"):
            path.write_text(self.to_mermaid())
        else:
            raise unsupported_graph_suffix(suffix)
        return path


# Drawings keep names to about this many characters (tables and the JSON/GraphML ``label`` keep them whole).
DRAWING_NAME_WIDTH = 60
MERMAID_CLASSES = {
    "conflict": "fill:#fde2e1,stroke:#c62828,stroke-width:3px",  # the op that fails or gets mixed dtypes
    "culprit": "fill:#fff3cd,stroke:#e65100,stroke-width:3px",  # the odd-dtype operand and where it comes from
}
# Mermaid reads ``#code;`` as that character. Inside a quoted label only these need it: ``"`` ends the
# label, ``#`` starts a code, ``&<>`` would be markup in HTML labels, a leading backtick a Markdown string.
_MERMAID_ESCAPES = {ord(char): f"#{ord(char)};" for char in '"#&<>`'}


def mermaid_text(text: str) -> str:
    """``text`` safe inside a quoted Mermaid label: one line, quotes, codes and markup encoded."""
    return " ".join(text.split()).translate(_MERMAID_ESCAPES)


def ellipsize(text: str, width: int | None) -> str:
    """``text`` cut in the middle to ``width`` characters (None: whole)."""
    if width is None or len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head):]}"


def finite(bounds: tuple[float, float] | None) -> bool:
    """True for a range without inf or NaN, or an unknown one."""
    return bounds is None or (math.isfinite(bounds[0]) and math.isfinite(bounds[1]))


def format_range(bounds: tuple[float, float] | None) -> str:
    return "unknown" if bounds is None else f"[{bounds[0]:.4g}, {bounds[1]:.4g}]"


def _tensor_attributes(tensor: TensorRecord) -> dict[str, Any]:
    origin = tensor.origin or _PRODUCED
    attributes: dict[str, Any] = dict(
        kind="tensor",
        dtype=dtype_name(tensor.dtype),
        shape=tuple(tensor.shape),
        device=str(tensor.device),
        origin=origin.kind,
        name=origin.name,
    )
    if tensor.stats is not None:
        attributes.update(min=tensor.stats[0], max=tensor.stats[1])
    return attributes


def _node_order(node: str) -> tuple[str, int]:
    return node[0], int(node.lstrip("opt"))


def _export_ready(graph: DtypeGraph) -> nx.DiGraph:
    """A plain copy whose attributes are all str/int/float/bool, as GraphML and JSON need."""
    plain = nx.DiGraph()
    plain.graph.update({key: value for key, value in graph.graph.items()
                        if value is not None and key not in _NOT_EXPORTED})
    for node, data in graph.nodes(data=True):
        plain.add_node(node, label=graph.label(node), **{key: _scalar(value) for key, value in data.items()
                                                         if value is not None and key not in _NOT_EXPORTED})
    for source, target, data in graph.edges(data=True):
        plain.add_edge(source, target, **{key: _scalar(value) for key, value in data.items()})
    return plain


_NOT_EXPORTED = frozenset({"packet", "attention_calls"})


def _scalar(value: Any) -> Any:
    if isinstance(value, tuple):
        return str(list(value))
    return str(value) if isinstance(value, str) else value  # OriginKind as a plain str
