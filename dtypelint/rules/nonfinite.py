"""DT103 nonfinite."""

from __future__ import annotations

from collections.abc import Iterator

from dtypelint.diagnostics import Applicability, Finding, Fix, Severity
from dtypelint.graph import DtypeGraph, finite, format_range
from dtypelint.rules.base import Rule, RuleContext
from dtypelint.vocabulary import OriginKind


def unmeasured(graph: DtypeGraph, tensor: str) -> bool:
    """An activation whose values were not measured (float32 and wider cost too much to read)."""
    if graph.value_range(tensor) is not None:
        return False
    return graph.tensor(graph.source(tensor, through_copies=True))["origin"] == OriginKind.OP  # weights: finite


class Nonfinite(Rule):
    """
    ## What it does
    In value mode, finds each op that produces inf or NaN in a float16/bfloat16 (or narrower) tensor from
    finite inputs (the origin, not the ops that propagate it) when those values reach the end of the
    forward, and reports its input ranges. An inf that a later op masks or clamps (T5's float16 clamp) is
    not reported. Where the op's inputs were not measured (float32), the values measured before them are
    checked: the op is named only as a likely origin, as a warning.

    ## Why is this bad?
    float16 tops out at 65504. One activation past it becomes inf, the next normalisation turns it into
    NaN, and the model emits garbage (or NaN logits that break sampling) with no exception. The first op
    that overflowed is where to act; every op after it only propagates the damage.

    ## Example
    A float16 MLP whose up projection produces 7e4 for a long prompt: `aten.mm` returns inf.

    A diffusers VAE decoder is the classic case (SDXL's, float16 black images): the message names its ways
    out (bfloat16 or float32, `force_upcast`, a VAE fine-tuned for float16).

    Use instead: `dtypelint precision PATH --dtype float16` names the fewest modules to keep in float32
    (islands: float32 weights, inputs cast to float32, outputs cast back), verified against a float32 run,
    or the dtype that works when no such modules do (a residual stream past 65504: bfloat16).

    ## Fix safety
    Unsafe (`--fix --unsafe-fixes`): the verified precision plan's modules run as float32 islands. It
    changes the model's numerics on purpose (closer to float32) and its speed and memory (those modules
    compute in float32). Where no island set works, there is no fix: the finding's report says which
    dtype does.

    ## Known problems
    Needs value statistics (`audit(..., stats=True)`, the default); meta mode has no values. float32
    and float64 tensors are not measured (cost), so a NaN made in float32 is reported, as a warning, where
    it first reaches a half-precision tensor. A value is followed to the end through unmeasured tensors,
    so an inf that a float32 op removes counts as reaching the end only if a later half tensor shows it.
    """

    code = "DT103"
    name = "nonfinite"
    severity = Severity.ERROR
    fix_availability = "sometimes"
    uses_value_statistics = True

    def check(self, context: RuleContext) -> Iterator[Finding]:
        graph = context.graph
        harmless: set[str] = set()  # tensors whose values, followed forward, never reach the end
        clean_upstream: set[str] = set()  # unmeasured tensors with only finite measured values behind them
        for op in graph.ops():
            ranges = [graph.value_range(t) for t in graph.outputs(op)]
            self.looked(context, any(bounds is not None for bounds in ranges))  # an op whose values were measured
            produced = [t for t, bounds in zip(graph.outputs(op), ranges, strict=True) if not finite(bounds)]
            if not produced or not graph.computes_values(op):
                continue
            inputs = graph.floating_inputs(op)
            ranges = [graph.value_range(tensor) for tensor in inputs]
            if not all(finite(bounds) for bounds in ranges):
                continue  # inputs already non-finite: an earlier op (or the input) is the origin
            blind = [tensor for tensor in inputs if unmeasured(graph, tensor)]
            if any(_nonfinite_behind(graph, tensor, clean_upstream) for tensor in blind):
                continue  # the measured values before the unmeasured inputs were already non-finite
            if not _reaches_end(graph, produced, harmless):
                continue  # masked or clamped later: the output never sees it
            yield self._finding(graph, op, inputs, ranges, produced[0], likely=bool(blind),
                                in_vae=_in_vae(context.model.class_name, graph.op(op)["module"]))

    def _finding(self, graph: DtypeGraph, op: str, inputs: list[str], ranges: list, produced: str,
                 likely: bool, in_vae: bool) -> Finding:
        data, output = graph.op(op), graph.tensor(produced)
        described = "; ".join(
            f"{graph.describe(tensor)} {graph.tensor(tensor)['dtype']} {format_range(bounds)}"
            for tensor, bounds in zip(inputs, ranges, strict=True)
        )
        where = ("inputs not measured (the values measured before them are finite, so the origin is here or "
                 "in the unmeasured ops before)" if likely else "finite inputs")
        return self.finding(
            location=data["module"],
            op=data["name"],
            dtypes=sorted({output["dtype"], *(graph.tensor(t)["dtype"] for t in inputs)}),
            message=f"{data['name']} produced non-finite values ({output['dtype']} range "
            f"{format_range(graph.value_range(produced))}) from {where}, and they reach the end of the forward: "
            f"{described}" + (VAE_WAYS_OUT if in_vae else _ways_out(data["module"])),
            node=op,
            severity=Severity.WARNING if likely else None,
            fix=Fix((), "float32", Applicability.UNSAFE, "keep the modules `dtypelint precision` finds in float32"),
        )


# What diffusers users do about a VAE that overflows float16 (the SDXL VAE's black images).
VAE_WAYS_OUT = ("; a diffusers VAE past float16's range: run it in bfloat16 or float32 (pipelines upcast a VAE whose "
                "config says force_upcast=True), or use a VAE fine-tuned for float16 (madebyollin/sdxl-vae-fp16-fix)")


def _ways_out(module: str) -> str:
    return (f"; ways out: keep {module or 'the model'} in float32, run in bfloat16 (float32's range), or "
            f"`dtypelint precision` finds the fewest modules to keep in float32, verified by a forward")


def _in_vae(class_name: str, module: str) -> bool:
    """A diffusers autoencoder audited alone, or a pipeline's ``vae`` component."""
    return class_name.startswith("Autoencoder") or module == "vae" or module.startswith("vae.")


def _carries(graph: DtypeGraph, tensor: str) -> bool:
    """Measured non-finite, or not measured at all (it may carry what it was computed from)."""
    if not graph.dtype(tensor).is_floating_point:
        return False  # isinf(x), argmax(x): the values were inspected, not passed on
    bounds = graph.value_range(tensor)
    return bounds is None or not finite(bounds)


def _reaches_end(graph: DtypeGraph, start: list[str], harmless: set[str]) -> bool:
    """Whether non-finite values in ``start`` reach what the forward returned. Where the trace does not know
    that (the forward raised), a tensor no op reads stands for it: measured non-finite there, or unmeasured
    as an op's main output. ``harmless`` memoizes the dead ends."""
    returns_known = graph.graph.get("returns_known", False)
    seen: set[str] = set()
    frontier = [tensor for tensor in start if tensor not in harmless]
    while frontier:
        tensor = frontier.pop()
        if tensor in seen or tensor in harmless or not _carries(graph, tensor):
            continue
        seen.add(tensor)
        consumers = graph.consumers(tensor)
        if returns_known:
            if graph.tensor(tensor).get("returned") and not finite(graph.value_range(tensor)):
                return True  # measured non-finite in what the forward returned
        elif not consumers and (graph.value_range(tensor) is not None or _main_output(graph, tensor)):
            return True
        frontier += [output for op in consumers for output in graph.outputs(op)]
    harmless |= seen
    return False


def _main_output(graph: DtypeGraph, tensor: str) -> bool:
    """Not a by-product (a norm's saved mean and rstd): those are never a forward's result."""
    producer = graph.producer(tensor)
    return producer is None or graph.outputs(producer)[0] == tensor


def _nonfinite_behind(graph: DtypeGraph, tensor: str, clean: set[str]) -> bool:
    """Whether the nearest measured values behind an unmeasured tensor include inf or NaN."""
    seen: set[str] = set()
    frontier = [tensor]
    while frontier:
        node = frontier.pop()
        if node in seen or node in clean:
            continue
        seen.add(node)
        if not unmeasured(graph, node):
            if not finite(graph.value_range(node)):
                return True
            continue
        producer = graph.producer(node)
        frontier += graph.floating_inputs(producer) if producer else []
    clean |= seen
    return False
