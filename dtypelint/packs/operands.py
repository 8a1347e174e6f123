"""Where a backend kernel's operands are in a traced model.

A fused backend kernel (ipex-llm's ``xe_addons``) never runs on the CPU that traces the model, so its
operands are mapped from the model's structure and the trace. A pack names operands with selectors,
each resolved against one module ``M`` that the contract matched:

``input``            the activation entering ``M``: the first floating tensor its ops consume that was made
                     outside it (not a parameter, buffer or attribute); one with the model's hidden size
                     last is preferred. For an attention module this is what its q/k/v projections read,
                     so the q/k/v dtype (a backend linear returns its input's dtype).
``raw-input``        the first tensor of any dtype entering ``M`` (a uint8 input to a linear).
``owner-input``      ``input`` of ``M``'s parent module (the attention layer that owns a rotary module).
``outputs``          the floating tensors ``M`` produces that ops outside it consume (a rotary module's cos/sin).
``consumer-input``   ``input`` of the module that consumes ``M``'s first output (the attention layer
                     receiving a model-level rotary module's cos/sin).
``mask``             a 4-D floating tensor entering ``M`` other than ``input`` (the additive attention mask).
``buffer:a|b``       ``M``'s buffer (or plain tensor attribute) ``a``, else ``b``: read from the model, so a
                     buffer the forward never touches (ipex-llm reads ``inv_freq`` inside the kernel) counts.
``param:a|b``        ``M``'s parameter ``a``, else ``b``.
``sdpa-inputs``      query, key and value of the first scaled-dot-product-attention op ``M`` runs.
``child-output:c``   the floating output of ``M``'s child module ``c``.
``attr:a``           ``M``'s ``torch.dtype`` attribute ``a`` (bitsandbytes' ``compute_dtype``).

Contracts on op sites (``site = "op"``) name an aten op's operands by their schema name: ``arg:weight``.
Contracts on attention sites (``site = "attention"``, the calls ``dtypelint.attention`` records) name
``query``, ``key``, ``value`` and ``attn-mask``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from functools import cached_property

from dtypelint.attention import AttentionCall
from dtypelint.dtypes import dtype_name
from dtypelint.graph import DtypeGraph
from dtypelint.model_info import ModelInfo
from dtypelint.vocabulary import STREAM_ORIGINS, WEIGHT_ORIGINS, OpKind, OriginKind

SELECTORS = ("input", "raw-input", "owner-input", "outputs", "consumer-input", "mask", "sdpa-inputs")
ATTENTION_SELECTORS = ("query", "key", "value", "attn-mask")
PREFIXED_SELECTORS = ("buffer:", "param:", "child-output:", "attr:")
OP_PREFIX = "arg:"
SITE_SELECTORS = {
    "module": (SELECTORS, PREFIXED_SELECTORS),
    "op": ((), (OP_PREFIX,)),
    "attention": (ATTENTION_SELECTORS, ()),
}


def valid_selector(selector: str, site: str = "module") -> bool:
    """True for a selector that a contract on ``site`` sites (module, op or attention) can use."""
    names, prefixes = SITE_SELECTORS[site]
    if selector in names:
        return True
    prefix = next((p for p in prefixes if selector.startswith(p)), None)
    return prefix is not None and bool(selector[len(prefix):].strip("|"))


@dataclass(frozen=True)
class Operand:
    """A resolved kernel operand: a label for messages, its dtype, and the tensor name or graph node."""

    label: str
    dtype: str
    name: str | None = None
    node: str | None = None


def parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def inside(module: str, path: str) -> bool:
    return not path or module == path or module.startswith(path + ".")


class ModelSites:
    """Per-module views of the graph, computed once per audit and shared by the contract rules."""

    def __init__(self, graph: DtypeGraph, model: ModelInfo) -> None:
        self.graph = graph
        self.model = model

    @cached_property
    def _ops_by_module(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = defaultdict(list)
        for op in self.graph.ops():
            index[self.graph.op(op)["module"]].append(op)
        return index

    def ops(self, path: str) -> list[str]:
        """The ops of ``path`` and its submodules, in execution order."""
        chosen = [op for module, ops in self._ops_by_module.items() if inside(module, path) for op in ops]
        return sorted(chosen, key=lambda op: self.graph.op(op)["index"])

    def entering(self, path: str) -> list[str]:
        """Tensors made outside ``path`` that its ops consume (weights excluded), in first-use order."""
        graph, seen = self.graph, {}
        for op in self.ops(path):
            for tensor, _ in graph.inputs(op):
                if tensor in seen or graph.tensor(tensor)["origin"] in WEIGHT_ORIGINS:
                    continue
                producer = graph.producer(tensor)
                if producer is None or not inside(graph.op(producer)["module"], path):
                    seen[tensor] = None
        return list(seen)

    def input(self, path: str, *, floating: bool = True) -> str | None:
        graph = self.graph
        # Activations only: a tensor no traced op made and no forward argument is state stashed outside the
        # module tree (bitsandbytes' ``weight.SCB``), never the stream.
        candidates = [
            t for t in self.entering(path)
            if graph.tensor(t)["origin"] in STREAM_ORIGINS and (not floating or graph.dtype(t).is_floating_point)
        ]
        hidden = [t for t in candidates if graph.tensor(t)["shape"][-1:] == (self.model.hidden_size,)]
        return (hidden or candidates or [None])[0]

    def outputs(self, path: str) -> list[str]:
        graph, found = self.graph, []
        for op in self.ops(path):
            for tensor in graph.outputs(op):
                if graph.dtype(tensor).is_floating_point and any(
                    not inside(graph.op(consumer)["module"], path) for consumer in graph.consumers(tensor)
                ):
                    found.append(tensor)
        return found

    def resolve(self, selector: str, path: str) -> list[Operand]:
        """The operands ``selector`` names for the module at ``path`` (empty when it cannot be seen)."""
        graph = self.graph
        if selector in ("input", "raw-input", "owner-input"):
            where = parent(path) if selector == "owner-input" else path
            node = self.input(where, floating=selector != "raw-input")
            return [self._node_operand(node, f"the activation entering {where or '<model>'}")] if node else []
        if selector == "outputs":
            outputs = self.outputs(path)
            return [self._node_operand(node, f"output {n} of {path}") for n, node in enumerate(outputs)]
        if selector == "consumer-input":
            outputs = self.outputs(path)
            consumers = graph.consumers(outputs[0]) if outputs else []
            outside = [op for op in consumers if not inside(graph.op(op)["module"], path)]
            if not outside:
                return []
            module = graph.op(outside[0])["module"]
            node = self.input(module)
            return [self._node_operand(node, f"the activation entering {module}")] if node else []
        if selector == "mask":
            main = self.input(path)
            masks = [
                t for t in self.entering(path)
                if t != main and graph.dtype(t).is_floating_point and len(graph.tensor(t)["shape"]) == 4
            ]
            return [self._node_operand(masks[0], f"the attention mask entering {path}")] if masks else []
        if selector == "sdpa-inputs":
            attention = [op for op in self.ops(path) if graph.op_is(op, OpKind.ATTENTION)]
            if not attention:
                return []
            inputs = dict((argument, node) for node, argument in graph.inputs(attention[0]))
            roles = (("0", "query"), ("1", "key"), ("2", "value"))
            return [self._node_operand(inputs[key], f"the {role} of {path}") for key, role in roles if key in inputs]
        kind, _, names = selector.partition(":")
        if kind == "attr":
            qualified = f"{path}.{names}" if path else names
            dtype = self.model.dtype_attributes.get(qualified)
            return [Operand(qualified, dtype_name(dtype))] if dtype is not None else []
        if kind == "child-output":
            return [self._node_operand(node, f"output of {path}.{names}") for node in self.outputs(f"{path}.{names}")[:1]]
        wanted = OriginKind.PARAMETER if kind == "param" else OriginKind.BUFFER
        for name in names.split("|"):
            qualified = f"{path}.{name}" if path else name
            info = self.model.tensors.get(qualified)
            if info is not None and (info.kind == wanted or kind == "buffer" and info.kind == OriginKind.ATTRIBUTE):
                return [Operand(qualified, dtype_name(info.dtype), qualified, graph.find_tensor(qualified))]
        return []

    def _node_operand(self, node: str, label: str) -> Operand:
        data = self.graph.tensor(node)
        return Operand(label, data["dtype"], data["name"] if data["origin"] in WEIGHT_ORIGINS else None, node)

    # Op sites --------------------------------------------------------------------------------------------

    def op_operands(self, op: str, selector: str) -> list[Operand]:
        """``arg:a|b``: the op's tensor argument named ``a`` in its schema, else ``b``."""
        graph = self.graph
        data = graph.op(op)
        schema = getattr(data["packet"], data["target"].rsplit(".", 1)[-1])._schema
        by_name = {
            schema.arguments[int(argument)].name if argument.isdigit() else argument: node
            for node, argument in graph.inputs(op)
        }
        for name in selector.removeprefix(OP_PREFIX).split("|"):
            if name in by_name:
                operand = self._node_operand(by_name[name], f"the {name} of {data['name']}")
                return [replace(operand, label=operand.name or operand.label)]
        return []


def attention_operands(call: AttentionCall, selector: str) -> list[Operand]:
    """``query``, ``key``, ``value`` or ``attn-mask`` of a recorded attention call (no mask: nothing)."""
    role = selector.replace("attn-", "attention ")
    dtype = getattr(call, selector.removeprefix("attn-"))
    return [Operand(f"the {role} of {call.module or '<model>'}", dtype)] if dtype is not None else []
