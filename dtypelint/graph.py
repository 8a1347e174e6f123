"""Stage 3 of the pipeline: the dtype graph built from a trace.

``DtypeGraph`` *is* a ``networkx.DiGraph``. Op nodes (``op0``, ``op1``, ... in execution order) and
tensor nodes (``t0``, ``t1``, ...) alternate: an edge ``tensor -> op`` is an input (attribute ``arg``,
the argument position or keyword), an edge ``op -> tensor`` an output. An in-place op produces a new
version of the tensor it mutates, so the graph stays acyclic. A graph built from a trace answers the
rules' queries from its ``Links`` (an op's inputs and outputs, a tensor's producer and consumers, made
once from the trace's records) and makes networkx's edge dicts only when networkx's own API is first used
(exports, drawings, ``nx`` algorithms): they were half the cost of the build, and no rule reads them.

Op node attributes: ``kind="op"``, ``index``, ``target`` (``aten.mm.default``), ``name`` (``aten.mm``),
``module`` (state-dict path of the module that ran it, ``""`` for the root), ``inplace``, ``failed`` (it
raised, or refused its dtypes and the trace went past it: ``Tracer.go_past``),
``autocast`` (a cast autocast made), ``step`` (0: the first call; n: decode step n). A ``python.NAME`` op is a function of the model's code that raised a
dtype error before any op ran, with the tensors its frame held.
Tensor node attributes: ``kind="tensor"``, ``dtype`` (``"float16"``), ``shape`` (tuple), ``device``,
``origin`` (``parameter`` | ``buffer`` | ``attribute`` | ``input`` | ``constant`` | ``op``), ``name``
(qualified name of a leaf), ``stored_kind``/``stored_name`` (an activation the forward assigned to a
buffer or attribute), ``returned`` (the forward returned it), and in value mode with statistics ``min``/``max``. The data exports
(``to_node_link``, ``to_graphml``) add ``label`` (``DtypeGraph.label``: the tensor's name or producer, dtype
and shape); the drawings (Mermaid, DOT) and ``write_graph`` are ``dtypelint.drawing``'s.
"""

from __future__ import annotations

import bisect
import functools
import gc
import io
import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypedDict

import networkx as nx
import torch
from torch._ops import OpOverloadPacket

from dtypelint.dtypes import dtype_name, wider
from dtypelint.escape import printable, xml_text
from dtypelint.tracer import Origin, TensorRecord, Tracer, TraceResult
from dtypelint.vocabulary import LEAF_ORIGINS, WEIGHT_ORIGINS, OpKind, OriginKind, kinds_of

_PRODUCED = Origin(OriginKind.OP)
_DTYPES = {dtype_name(dtype): dtype for dtype in vars(torch).values() if isinstance(dtype, torch.dtype)}
_FLOATING = frozenset(name for name, dtype in _DTYPES.items() if dtype.is_floating_point)


class OpNode(TypedDict):
    kind: str
    index: int
    target: str
    name: str
    packet: OpOverloadPacket  # the vocabulary's key; not exported
    kinds: frozenset[OpKind]  # the vocabulary's kinds of the op, looked up once; not exported
    module: str
    inplace: bool
    failed: bool
    autocast: bool  # a cast that autocast made: the code passed its input, the kernel got its output
    step: int  # 0: the first call; n: decode step n (``Options.steps``)


class TensorNode(TypedDict, total=False):
    kind: str
    dtype: str
    shape: tuple[int, ...]
    device: str
    origin: OriginKind
    name: str | None
    min: float  # value mode with statistics only
    max: float
    stored_kind: OriginKind  # an activation the forward assigned to a buffer or tensor attribute
    stored_name: str
    returned: bool  # the model's forward returned it (graph.graph["returns_known"]: the trace knows them)


_ROOTS_KEPT = 4  # a finding names a few roots; keeping every one would cost quadratic memory on long chains
_DERIVATION_SHOWN = 6


@dataclass(frozen=True)
class Lineage:
    """Where a tensor's floating dtype entered the graph, following back only the inputs of that dtype.

    ``roots``: leaves stored in the dtype (a buffer, a parameter, a constant made in forward) and the
    leaves a value of the dtype was made from by a cast of weights or indices (``positions.float()``,
    ``attention_mask.to(torch.float32)``). ``casts``: explicit casts of activations to the dtype
    (``x.float()`` in a norm). Both are capped at a few, in graph order.
    """

    roots: tuple[str, ...] = ()
    casts: tuple[str, ...] = ()
    mixed: bool = False  # an op on the way also took another dtype: the stream, promoted by the roots
    data: bool = False  # a root is a model input with a data's shape (a sample, a waveform), not positions

    @property
    def from_weights(self) -> bool:
        """True when the dtype came from weights and indices only: no activation was cast to make it."""
        return bool(self.roots) and not self.casts

    @property
    def table(self) -> bool:
        """A derived table: its values, not only its dtype, come from weights and indices alone."""
        return self.from_weights and not self.mixed

    def merge(self, other: Lineage) -> Lineage:
        return Lineage(_capped(self.roots, other.roots), _capped(self.casts, other.casts), self.mixed or other.mixed,
                       self.data or other.data)


def _carries_data(shape: tuple[int, ...] | None) -> bool:
    """Whether a model input has a data's shape (a sample, a waveform, hidden states): positions and timesteps
    come one per sample or as a few coordinates per token (Flux's ``img_ids``, ``(tokens, 3)``)."""
    return shape is not None and len(shape) > 2


def _capped(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(first + second))[:_ROOTS_KEPT]


@dataclass(frozen=True)
class Links:
    """Who feeds whom, by node: an op's ``(tensor, argument)`` inputs (one per tensor, as a digraph has one
    edge: the last argument that passed it) and its outputs, a tensor's producer and its consumers."""

    inputs: dict[str, tuple[tuple[str, str], ...]]
    outputs: dict[str, tuple[str, ...]]
    producer: dict[str, str]
    consumers: dict[str, list[str]]

    @classmethod
    def read(cls, graph: nx.DiGraph) -> Links:
        """The links of a graph made through networkx's API (a copy), read from its edges."""
        ops = [node for node, data in graph.nodes(data="kind") if data == "op"]
        outputs = {op: tuple(graph.succ[op]) for op in ops}
        return cls(
            inputs={op: tuple((source, data["arg"]) for source, data in graph.pred[op].items()) for op in ops},
            outputs=outputs,
            producer={tensor: op for op in ops for tensor in outputs[op]},
            consumers={node: list(graph.succ[node]) for node, data in graph.nodes(data="kind") if data == "tensor"},
        )


class _EdgesOnFirstRead:
    """networkx's adjacency dicts (``_adj`` and ``_succ``, one dict, and ``_pred``) of a graph built from a
    trace: made from its links on the first read. Set as networkx sets them (its own descriptors keep
    ``_adj`` and ``_succ`` one and reset the cached views)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, graph: DtypeGraph | None, owner: type | None = None) -> Any:
        if graph is None:
            return self
        if self.name not in graph.__dict__:
            graph.add_traced_edges()
        return graph.__dict__[self.name]

    def __set__(self, graph: DtypeGraph, value: Any) -> None:
        vars(nx.DiGraph)[self.name].__set__(graph, value)


class DtypeGraph(nx.DiGraph):
    """A networkx digraph of ops and tensors with the queries the rules need."""

    _adj = _EdgesOnFirstRead()
    _succ = _EdgesOnFirstRead()
    _pred = _EdgesOnFirstRead()

    @classmethod
    def from_tracer(cls, tracer: Tracer, error: BaseException | None = None) -> DtypeGraph:
        """The graph of whatever ran inside ``with Tracer(model):`` (``error``: what it raised, if it did)."""
        return cls.from_trace(TraceResult(tracer, error))

    @classmethod
    def from_trace(cls, result: TraceResult) -> DtypeGraph:
        with no_cyclic_collection():  # a node's dicts make no cycles: a third of the build went to the collector
            return cls._built(result)

    @classmethod
    def _built(cls, result: TraceResult) -> DtypeGraph:
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
            autocast_policy=tracer.autocast_device,
            failure_module=tracer.failure_module,
            torch_log=tuple(dict.fromkeys(result.torch_log)),
            step_starts=tuple(result.step_starts),
            step_name=result.step_name,
            returns_known=bool(tracer.returned),
            attention_calls=tuple(tracer.attention.calls),  # dtypelint.attention.AttentionCall; not exported
        )
        tensors = [f"t{index}" for index in range(len(tracer.tensors))]
        graph._node.update(zip(tensors, map(_tensor_attributes, tracer.tensors), strict=True))
        for index in tracer.returned:
            graph._node[tensors[index]]["returned"] = True
        ops: dict[str, dict[str, Any]] = {}
        links = Links({}, {}, {}, {})
        autocast_casts = {index for casts in tracer.autocast_casts for index in casts}
        identities: dict[int, dict[str, Any]] = {}  # per distinct op: its names and kinds, worked out once
        for index, record in enumerate(tracer.records):
            identity = identities.get(id(record.func))
            if identity is None:
                identity = identities[id(record.func)] = _op_identity(record.func)
            op = f"op{index}"
            ops[op] = dict(
                identity,
                kind="op",
                index=index,
                module=record.module,
                failed=record.refused or not record.completed,
                autocast=index in autocast_casts,
                step=bisect.bisect_right(result.step_starts, index),  # 0: the first call; n: decode step n
            )
            arguments = {tensors[tensor]: argument for argument, tensor in record.inputs}
            links.inputs[op] = tuple(arguments.items())
            for tensor in arguments:
                links.consumers.setdefault(tensor, []).append(op)
            made = links.outputs[op] = tuple(tensors[tensor] for tensor in record.outputs or ())
            for tensor in made:
                links.producer[tensor] = op
            if not record.inputs:
                for tensor in made:
                    graph._node[tensor].update(origin=OriginKind.CONSTANT, name=identity["name"])
        graph._node.update(ops)
        graph.__dict__.update(links=links, _listed_nodes={"tensor": tuple(tensors), "op": tuple(ops)})
        for name in ("_adj", "_succ", "_pred"):
            del graph.__dict__[name]  # made on the first read: ``add_traced_edges``
        return graph

    def add_traced_edges(self) -> None:
        """networkx's edges, from the links: for networkx's own API (exports, drawings, algorithms)."""
        successors: dict[str, dict[str, dict[str, Any]]] = {node: {} for node in self._node}
        predecessors: dict[str, dict[str, dict[str, Any]]] = {node: {} for node in self._node}
        for op, inputs in self.links.inputs.items():
            for tensor, argument in inputs:
                successors[tensor][op] = predecessors[op][tensor] = {"arg": argument}
            for position, tensor in enumerate(self.links.outputs[op]):
                successors[op][tensor] = predecessors[tensor][op] = {"out": position}
        self._adj = successors
        self._pred = predecessors

    def copy(self, as_view: bool = False) -> DtypeGraph:
        """An independent copy (attribute dicts copied) with the same links: networkx's own copy adds edges
        by source node, which would reorder an op's inputs (argument 0 first is what ``source`` follows)."""
        if as_view:
            return super().copy(as_view=True)  # type: ignore[return-value]
        copied = type(self)()
        copied.graph.update(self.graph)
        copied._node.update((node, dict(data)) for node, data in self._node.items())
        copied.__dict__["links"] = self.links
        for name in ("_adj", "_succ", "_pred"):
            del copied.__dict__[name]
        return copied

    @functools.cached_property
    def links(self) -> Links:
        """Who feeds whom (see ``Links``). Made with the graph from a trace; read from the edges of a graph
        made otherwise."""
        return Links.read(self)

    # Queries -------------------------------------------------------------------------------------------

    # The node dicts and the links are read directly: these queries run for every op of every rule, and
    # networkx's views cost several times more.
    def op(self, node: str) -> OpNode:
        return self._node[node]  # type: ignore[return-value]

    def tensor(self, node: str) -> TensorNode:
        return self._node[node]  # type: ignore[return-value]

    def op_is(self, op: str, kind: OpKind) -> bool:
        return kind in self._node[op]["kinds"]

    def ops(self) -> Iterator[str]:
        """Op nodes in execution order."""
        return iter(self._listed("op"))

    def tensors(self) -> Iterator[str]:
        return iter(self._listed("tensor"))

    def _listed(self, kind: str) -> tuple[str, ...]:
        """The nodes of a kind, listed once: every rule walks them, and the graph is not changed once built."""
        listed: dict[str, tuple[str, ...]] = self.__dict__.setdefault("_listed_nodes", {})
        if kind not in listed:
            listed[kind] = tuple(node for node, data in self._node.items() if data["kind"] == kind)
        return listed[kind]

    def failed_op(self) -> str | None:
        """The op at which the forward raised, if it raised inside one."""
        return next((op for op in self.ops() if self._node[op]["failed"]), None)

    def inputs(self, op: str) -> list[tuple[str, str]]:
        """``(tensor node, argument)`` pairs of an op, in argument order."""
        return list(self.links.inputs[op])

    def outputs(self, op: str) -> list[str]:
        return list(self.links.outputs[op])

    def producer(self, tensor: str) -> str | None:
        return self.links.producer.get(tensor)

    def consumers(self, tensor: str) -> list[str]:
        return list(self.links.consumers.get(tensor, ()))

    def dtype(self, tensor: str) -> torch.dtype:
        return _DTYPES[self._node[tensor]["dtype"]]

    def floating_inputs(self, op: str) -> list[str]:
        """The op's floating inputs, in argument order. Memoized per graph (a fresh list each call)."""
        memo: dict[str, tuple[str, ...]] = self.__dict__.setdefault("_floating_inputs", {})
        floating = memo.get(op)
        if floating is None:
            nodes = self._node
            floating = memo[op] = tuple(node for node, _ in self.links.inputs[op] if nodes[node]["dtype"] in _FLOATING)
        return list(floating)

    def leaves(self, tensor: str) -> list[str]:
        """Every leaf tensor (parameter, buffer, attribute, input, constant) the tensor derives from."""
        behind, frontier = {tensor}, [tensor]
        while frontier:
            op = self.links.producer.get(frontier.pop())
            fresh = [source for source, _ in self.links.inputs[op] if source not in behind] if op else []
            behind.update(fresh)
            frontier += fresh
        return [node for node in sorted(behind, key=node_order) if self._node[node]["origin"] in LEAF_ORIGINS]

    def find_tensor(self, name: str) -> str | None:
        """The leaf node of a named parameter, buffer, attribute or input, if the forward used it."""
        return next((node for node, label in self.nodes(data="name") if label == name), None)

    def leaf_nodes(self, name: str) -> list[str]:
        """Every node of a named parameter, buffer, attribute or input (one per version the forward read).
        Indexed once per graph: rules ask for every tensor of the model."""
        index: dict[str, list[str]] | None = self.__dict__.get("_leaf_index")
        if index is None:
            index = {}
            for node, data in self._node.items():
                if data["kind"] == "tensor" and data["origin"] in LEAF_ORIGINS and data["name"]:
                    index.setdefault(data["name"], []).append(node)
            self.__dict__["_leaf_index"] = index
        return index.get(name, [])

    def uncast_meeting(self, tensor: str) -> str | None:
        """The first op that computes with ``tensor``, or with a table derived from it, next to a floating
        input of another dtype: where a weight off the compute dtype meets the stream without an explicit
        cast. None when every path ends in a cast, or meets the stream already cast to the weight's dtype."""
        dtype = self._node[tensor]["dtype"]
        frontier, seen = [tensor], {tensor}
        while frontier:
            node = frontier.pop()
            for op in self.links.consumers.get(node, ()):
                if self.op_is(op, OpKind.CAST):
                    continue
                if any(self._node[source]["dtype"] != dtype for source in self.floating_inputs(op)):
                    return op
                fresh = [output for output in self.links.outputs[op]
                         if output not in seen and self.lineage(output).from_weights]
                seen.update(fresh)
                frontier += fresh
        return None

    def source(self, tensor: str, *, through_copies: bool = False) -> str:
        """The tensor this one is a view of, followed back through view ops (and, with
        ``through_copies``, through ops that copy values of their first input: index, gather, ...)."""
        node = tensor
        while (op := self.producer(node)) is not None and self._follows(op, through_copies):
            node = self.inputs(op)[0][0]
        return node

    def _follows(self, op: str, through_copies: bool) -> bool:
        kinds = self._node[op]["kinds"]
        if OpKind.VIEW in kinds:
            return True
        return through_copies and OpKind.COPIES_VALUES in kinds and OpKind.CONCATENATES not in kinds

    def leaf_name(self, tensor: str) -> str | None:
        """The name of a parameter, buffer, attribute or input; None for a constant (whose ``name`` is the
        op that made it) and an activation."""
        data = self._node[tensor]
        return data["name"] if data["origin"] in LEAF_ORIGINS - {OriginKind.CONSTANT} else None

    def stored(self, tensor: str) -> str | None:
        """The tensor, or one it is a view of, that the forward assigned to a buffer or attribute."""
        node = tensor
        while "stored_name" not in self._node[node]:
            op = self.producer(node)
            if op is None or not self._follows(op, through_copies=False):
                return None
            node = self.inputs(op)[0][0]
        return node

    def blamed_leaf(self, tensor: str) -> str | None:
        """The name to blame for an operand's dtype: the buffer the forward stored it in, the parameter,
        buffer or input it is a view or copy of, or the root of the table it was derived from."""
        if stored := self.stored(tensor):
            return self._node[stored]["stored_name"]
        source = self.source(tensor, through_copies=True)
        return self.leaf_name(source) or next(filter(None, map(self.leaf_name, self.root_leaves(tensor))), None)

    def describe(self, tensor: str) -> str:
        """A short human label: ``buffer model.rotary_emb.inv_freq`` or ``activation of aten.mul``."""
        source = self.tensor(self.source(tensor))
        if source["origin"] in LEAF_ORIGINS - {OriginKind.CONSTANT}:
            return f"{source['origin']} {source['name']}"
        if source["origin"] == OriginKind.CONSTANT:
            return f"constant from {source['name']}" if source["name"] else "constant"
        op = self.producer(self.source(tensor))
        made = f"activation from {self.nodes[op]['name']}" if op else "activation"
        if stored := self.stored(tensor):
            data = self._node[stored]
            return f"{data['stored_kind']} {data['stored_name']} (assigned in forward: {made})"
        return made

    # Provenance of a dtype -------------------------------------------------------------------------

    def lineage(self, tensor: str) -> Lineage:
        """Where the tensor's dtype came from (see ``Lineage``). Memoized per graph; iterative, so a chain
        of 10^5 ops neither recurses nor is walked twice."""
        memo: dict[str, Lineage] = self.__dict__.setdefault("_lineages", {})
        stack = [tensor]
        while stack:
            node = stack[-1]
            if node in memo:
                stack.pop()
                continue
            pending = [source for source in self._same_dtype_inputs(node) if source not in memo]
            if pending:
                stack += pending
                continue
            memo[node] = self._lineage_here(node, memo)
            stack.pop()
        return memo[tensor]

    def root_leaves(self, tensor: str) -> list[str]:
        """The leaves a derived table's dtype comes from, stored-in-that-dtype weights first; empty when
        an activation was cast to make it (then it is the stream, not a table)."""
        lineage = self.lineage(tensor)
        if not lineage.from_weights:
            return []
        dtype = self._node[tensor]["dtype"]
        return sorted(lineage.roots, key=lambda root: self._root_rank(root, dtype))

    def derivation(self, tensor: str, root: str) -> list[str]:
        """The ops from ``root`` to ``tensor`` (names, oldest first, repeats folded), shortened in the middle."""
        parents: dict[str, str | None] = {tensor: None}
        queue = deque([tensor])
        while queue and root not in parents:
            node = queue.popleft()
            op = self.producer(node)
            if op is None:
                continue
            for source in self._same_dtype_inputs(node) or [source for source, _ in self.inputs(op)]:
                if source not in parents:
                    parents[source] = node
                    queue.append(source)
        names: list[str] = []
        node = root if root in parents else None
        while node is not None and (after := parents[node]) is not None:
            name = self._node[self.producer(after)]["name"]
            if not names or names[-1] != name:
                names.append(name)
            node = after
        if len(names) > _DERIVATION_SHOWN:
            names = [*names[:2], "...", *names[-(_DERIVATION_SHOWN - 3):]]
        return names

    def describe_derived(self, tensor: str) -> str:
        """``describe``, plus the root leaf and the derivation of a derived table:
        ``activation from aten.add, float32 from buffer m.cos_sin_cache through aten.index, aten.mul``."""
        roots = self.root_leaves(tensor)
        if not roots or self.source(tensor, through_copies=True) == roots[0]:
            return self.describe(tensor)
        steps = ", ".join(self.derivation(tensor, roots[0]))
        return f"{self.describe(tensor)}, {self._node[tensor]['dtype']} from {self.describe(roots[0])} through {steps}"

    def _same_dtype_inputs(self, tensor: str) -> list[str]:
        data = self._node[tensor]
        op = self.producer(tensor)
        if op is None or data["origin"] in LEAF_ORIGINS:
            return []
        return [source for source, _ in self.links.inputs[op] if self._node[source]["dtype"] == data["dtype"]]

    def _lineage_here(self, tensor: str, memo: dict[str, Lineage]) -> Lineage:
        data = self._node[tensor]
        if data["origin"] in LEAF_ORIGINS:
            return Lineage(roots=(tensor,), data=data["origin"] is OriginKind.INPUT and _carries_data(data["shape"]))
        same = self._same_dtype_inputs(tensor)
        if same:
            lineage = Lineage(mixed=len(same) < len(self.floating_inputs(self.producer(tensor))))  # type: ignore[arg-type]
            for source in same:
                lineage = lineage.merge(memo[source])
            return lineage
        return self._made_by(self.producer(tensor))  # type: ignore[arg-type]

    def _made_by(self, op: str) -> Lineage:
        """The lineage of a dtype that ``op`` made (a cast, ``softmax(dtype=)``): from what it cast."""
        inputs = self.floating_inputs(op) or [source for source, _ in self.inputs(op)]
        if not inputs:
            return Lineage()
        first = inputs[0]
        if not self.dtype(first).is_floating_point:  # indices or a mask: the table is made from them
            source = self.source(first, through_copies=True)
            leaves = [source] if self._node[source]["origin"] in LEAF_ORIGINS else self.leaves(first)
            return Lineage(roots=tuple(leaves[:_ROOTS_KEPT]))
        # Views only: a copy of a weight (an embedding lookup) is how the stream itself begins.
        source = self.source(first)
        if self._node[source]["origin"] in WEIGHT_ORIGINS | {OriginKind.CONSTANT}:
            return Lineage(roots=(source,))
        # A narrowing cast of a derived table (a float32 inv_freq computed in forward, cast to float16) keeps
        # the table's roots; widening an activation (the stream's x.float()) is a cast of the stream.
        made = self.outputs(op)[0]
        if wider(self.dtype(first), self.dtype(made)) and (table := self.lineage(first)).table:
            return Lineage(roots=table.roots)
        return Lineage(casts=(op,))

    def _root_rank(self, root: str, dtype: str) -> tuple[int, int, tuple[str, int]]:
        data = self._node[root]
        stored = 0 if data["dtype"] == dtype else 1
        weight = 0 if data["origin"] in WEIGHT_ORIGINS else 1 if data["origin"] == OriginKind.CONSTANT else 2
        return stored, weight, node_order(root)

    def computes_values(self, op: str) -> bool:
        """False for factories and fills, whose extreme values are chosen on purpose."""
        return bool(self.floating_inputs(op)) and not self.op_is(op, OpKind.FILL)

    def value_range(self, tensor: str) -> tuple[float, float] | None:
        """(min, max) recorded for a tensor; for views and copies (not measured, to save time) the range of
        what they copy: the first input's, or the union of a concatenation's inputs. Memoized per graph."""
        memo: dict[str, tuple[float, float] | None] = self.__dict__.setdefault("_ranges", {})
        if tensor not in memo:
            memo[tensor] = self._value_range(tensor)
        return memo[tensor]

    def _value_range(self, tensor: str) -> tuple[float, float] | None:
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
            if len({self._node[node]["dtype"] for node in self.floating_inputs(op)}) > 1:
                yield op

    def neighbourhood(self, node: str, radius: int = 2) -> DtypeGraph:
        """The subgraph within ``radius`` edges of ``node``, in either direction."""
        return self.subgraph(nx.ego_graph(self, node, radius=radius, undirected=True)).copy()

    def label(self, node: str, width: int | None = None) -> str:
        """``aten.addmm @ head`` for an op; for a tensor its name and type: a leaf's qualified name
        (``model.rotary_emb.inv_freq float32[16]``), a view's source (``head.weight (view) float32[16, 4]``),
        else its producer (``from aten.mm float16[2, 4]``). ``width``: drawings middle-ellipsize the name to
        about that many characters, keeping both ends (the model's prefix and the tensor's own name).
        A label is shown: names come out ``escape.printable``."""
        data = self.nodes[node]
        if data["kind"] == "op":
            where = f" @ {ellipsize(data['module'], width)}" if data["module"] else ""
            return printable(f"{data['name']}{where}")
        return printable(f"{ellipsize(self._tensor_name(node), width)} {data['dtype']}{list(data['shape'])}")

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

    def to_graphml(self) -> bytes:
        """GraphML of the whole graph: names kept, but for what XML forbids (``escape.xml_text``)."""
        document = io.BytesIO()
        nx.write_graphml(_export_ready(self, xml_text), document)
        return document.getvalue()


def ellipsize(text: str, width: int | None) -> str:
    """``text`` cut in the middle to ``width`` characters (None: whole)."""
    if width is None or len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head):]}"


def finite(bounds: tuple[float, float] | None) -> bool:
    """True for a range without inf or NaN, or an unknown one."""
    return bounds is None or (math.isfinite(bounds[0]) and math.isfinite(bounds[1]))


@contextmanager
def no_cyclic_collection() -> Iterator[None]:
    """The cyclic garbage collector paused (as it was before, afterwards); reference counting still frees."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def format_range(bounds: tuple[float, float] | None) -> str:
    return "unknown" if bounds is None else f"[{bounds[0]:.4g}, {bounds[1]:.4g}]"


def _tensor_attributes(tensor: TensorRecord) -> dict[str, Any]:
    origin = tensor.origin or _PRODUCED
    attributes: dict[str, Any] = dict(
        kind="tensor",
        dtype=dtype_name(tensor.dtype),
        shape=tuple(tensor.shape),
        device=_device_name(tensor.device),
        origin=origin.kind,
        name=origin.name,
    )
    if tensor.stats is not None:
        attributes.update(min=tensor.stats[0], max=tensor.stats[1])
    if tensor.stored_as is not None:
        attributes.update(stored_kind=tensor.stored_as.kind, stored_name=tensor.stored_as.name)
    return attributes


@functools.cache
def _device_name(device: torch.device) -> str:
    return str(device)


def _op_identity(func: Any) -> dict[str, Any]:
    target = str(func)
    packet = func.overloadpacket
    return dict(
        target=target,
        name=target.rsplit(".", 1)[0] if target.count(".") > 1 else target,
        packet=packet,
        kinds=kinds_of(packet),
        inplace=func._schema.is_mutable,
    )


def node_order(node: str) -> tuple[str, int]:
    """Trace order: ``op2`` before ``op10``, ops before tensors."""
    return node[0], int(node.lstrip("opt"))


def _export_ready(graph: DtypeGraph, text: Callable[[str], str] = str) -> nx.DiGraph:
    """A plain copy whose attributes are all str/int/float/bool, as GraphML and JSON need; ``text`` makes
    each string fit the file (GraphML: ``escape.xml_text``)."""
    plain = nx.DiGraph()
    plain.graph.update({key: _scalar(value, text) for key, value in graph.graph.items()
                        if value is not None and key not in _NOT_EXPORTED})
    for node, data in graph.nodes(data=True):
        attributes = {key: _scalar(value, text) for key, value in data.items()
                      if value is not None and key not in _NOT_EXPORTED}
        plain.add_node(node, label=graph.label(node), **attributes)  # printable: fits any file
    for source, target, data in graph.edges(data=True):
        plain.add_edge(source, target, **{key: _scalar(value, text) for key, value in data.items()})
    return plain


_NOT_EXPORTED = frozenset({"packet", "kinds", "attention_calls"})


def _scalar(value: Any, text: Callable[[str], str]) -> Any:
    if isinstance(value, tuple):
        return text(str(list(value)))
    return text(str(value)) if isinstance(value, str) else value  # OriginKind as a plain str
