"""Reliability: dtypelint against torch's own semantics, bad input, and memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import assert_unchanged, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dtypelint
from dtypelint import UsageError

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


class Chain(nn.Module):
    """``x`` in the compute dtype meets a parameter of another dtype in ``op``, then a few more ops."""

    def __init__(self, op: str, weight_dtype: torch.dtype, tail: list[str]) -> None:
        super().__init__()
        shape = (4, 4) if op == "matmul" else (4,)
        self.weight = nn.Parameter(torch.linspace(-1, 1, 16 if op == "matmul" else 4).reshape(shape).to(weight_dtype))
        self.op, self.tail = op, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = {"add": torch.add, "mul": torch.mul, "matmul": torch.matmul}[self.op](x, self.weight)
        for step in self.tail:
            h = {"relu": torch.relu, "neg": torch.neg, "square": torch.square, "double": lambda t: t + t}[step](h)
        return h


@settings(max_examples=40, deadline=None)
@given(
    op=st.sampled_from(["add", "mul", "matmul"]),
    compute=st.sampled_from(FLOATS),
    weight_dtype=st.sampled_from(FLOATS),
    tail=st.lists(st.sampled_from(["relu", "neg", "square", "double"]), max_size=3),
)
def test_verdicts_agree_with_torch_promotion_and_with_what_torch_raises(op, compute, weight_dtype, tail):
    model = Chain(op, weight_dtype, tail)
    x = torch.linspace(-2, 2, 8).reshape(2, 4).to(compute)
    try:
        expected = model(x).dtype
        raised = False
    except RuntimeError:
        raised = True
    before = snapshot(model)
    report = dtypelint.audit(model, x, dtype=compute)
    assert_unchanged(model, before)
    codes = {finding.code for finding in report.findings}
    assert ("DT001" in codes) == raised
    # matmul needs one dtype: mixed-input exactly when the dtypes differ (and torch raised).
    assert ("DT101" in codes) == (op == "matmul" and compute != weight_dtype)
    if op == "matmul" and compute != weight_dtype:
        assert raised
    if not raised:
        assert report.graph.nodes[report.graph.outputs(list(report.graph.ops())[-1])[0]]["dtype"] == str(
            expected
        ).removeprefix("torch.")
        promoted = torch.promote_types(compute, weight_dtype) != compute
        assert ("DT102" in codes) == (op != "matmul" and promoted)
        if promoted:
            assert expected == torch.result_type(x, model.weight)


class ReturnsOddThings(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.kind = kind

    def forward(self, x):
        h = self.lin(x)
        if self.kind == "strings":
            return {"text": "hello", "n": 3}
        if self.kind == "generator":
            return (t for t in [h, h])
        if self.kind == "cache":
            return h, [(h, h)], None
        return None


@pytest.mark.parametrize("kind", ["strings", "generator", "cache", "none"])
def test_forwards_returning_non_tensors_audit_normally(kind):
    report = dtypelint.audit(ReturnsOddThings(kind), torch.randn(2, 4))
    assert report.findings == [] and any(True for _ in report.graph.ops())


@pytest.mark.parametrize(
    ("model", "inputs", "message"),
    [
        ("not a model", torch.ones(2), "torch.nn.Module"),
        (nn.Linear(2, 2), "text", "inputs must be"),
        (nn.Linear(2, 2), 3.5, "inputs must be"),
        (nn.Linear(2, 2), {0: torch.ones(2)}, "string keys"),
    ],
)
def test_bad_api_input_is_a_usage_error(model, inputs, message):
    with pytest.raises(UsageError, match=message):
        dtypelint.audit(model, inputs)


def test_wrong_inputs_for_the_forward_are_a_finding_not_a_crash():
    report = dtypelint.audit(nn.Linear(4, 4), torch.ones(2, 3))
    assert [f.code for f in report.findings] == ["DT001"]
    assert "shapes cannot be multiplied" in report.findings[0].message


@pytest.mark.parametrize("enabled", [True, False])
def test_an_audit_pauses_the_cyclic_collector_and_leaves_it_as_it_found_it(tiny_llama_fp16, input_ids, enabled):
    seen: list[bool] = []
    hook = tiny_llama_fp16.model.layers[0].register_forward_hook(lambda *_: seen.append(gc.isenabled()))
    (gc.enable if enabled else gc.disable)()
    try:
        dtypelint.audit(tiny_llama_fp16, {"input_ids": input_ids})
        assert gc.isenabled() == enabled
    finally:
        gc.enable()
        hook.remove()
    assert seen and not any(seen)  # paused while the forward ran under the tracer


def test_a_value_audit_keeps_no_activation_alive(tiny_llama_fp16, input_ids):
    seen: list[weakref.ref] = []

    def remember(module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        if isinstance(tensor, torch.Tensor):
            seen.append(weakref.ref(tensor))

    handles = [layer.register_forward_hook(remember) for layer in tiny_llama_fp16.model.layers]
    report = dtypelint.audit(tiny_llama_fp16, {"input_ids": input_ids})
    for handle in handles:
        handle.remove()
    gc.collect()
    assert len(seen) == 4 and report.graph.number_of_nodes() > 0  # 2 layers, on the prompt and a decode step
    assert all(reference() is None for reference in seen)
