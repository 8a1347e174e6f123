"""Issue #12, mechanisms 2, 3 and 6: where a tensor's dtype came from (``DtypeGraph.lineage``), and the
rules that name it: a derived table's root leaf (DT101, DT102), the explicit cast that leaked (DT101), and
weights that meet the stream only through casts (DT105)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtypelint


def fp16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).half()



class TableScale(nn.Module):
    """A float32 table looked up by positions and computed on (mul, cos) before it meets the fp16 stream."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.linspace(0, 1, 32).view(8, 4))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x * (self.table[positions] * 2).cos()


class PaddingBias(nn.Module):
    """An additive mask built from an integer input in float32."""

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return x + (1.0 - attention_mask.to(torch.float32)) * torch.finfo(torch.float32).min


class LeakyNorm(nn.Module):
    """A LayerNorm computed in float32 whose result is not cast back before a float16 linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4).half()
        self.proj = nn.Linear(4, 4).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        return self.proj(F.layer_norm(x.float(), (4,), norm.weight.float(), norm.bias.float()))


def test_lineage_of_a_derived_table_ends_at_its_buffer_and_names_the_derivation():
    graph = dtypelint.trace(TableScale().eval(), (fp16(1, 3, 4), torch.tensor([1, 2, 5])))
    mul = [op for op in graph.ops() if graph.op(op)["name"] == "aten.mul"][-1]
    table = next(t for t in graph.floating_inputs(mul) if graph.tensor(t)["dtype"] == "float32")
    [root] = graph.root_leaves(table)
    assert graph.tensor(root)["name"] == "table"
    assert graph.lineage(table).from_weights
    assert graph.derivation(table, root) == ["aten.index", "aten.mul", "aten.cos"]
    assert "float32 from buffer table through aten.index, aten.mul, aten.cos" in graph.describe_derived(table)


def test_promotion_by_a_derived_table_names_its_root_buffer_without_a_fix():
    report = dtypelint.audit(TableScale().eval(), (fp16(1, 3, 4), torch.tensor([1, 2, 5])), dtype="float16")
    [finding] = report.by_code("DT102")
    assert (finding.tensor, finding.op, finding.fix) == ("table", "aten.mul", None)
    assert "from buffer table through aten.index" in finding.message


def test_promotion_by_a_mask_built_from_an_integer_input_names_the_input():
    mask = torch.tensor([[0, 1, 1]])
    [finding] = dtypelint.audit(PaddingBias().eval(), (fp16(1, 3), mask), dtype="float16").by_code("DT102")
    assert finding.tensor == "attention_mask"
    assert "from input attention_mask through aten._to_copy" in finding.message


def test_a_cast_of_the_stream_is_no_derived_table():
    graph = dtypelint.trace(LeakyNorm().eval(), fp16(2, 4))
    norm = next(op for op in graph.ops() if graph.op(op)["name"] == "aten.native_layer_norm")
    output = graph.outputs(norm)[0]
    lineage = graph.lineage(output)
    assert not lineage.from_weights and graph.root_leaves(output) == []
    [cast] = lineage.casts
    assert graph.tensor(graph.floating_inputs(cast)[0])["origin"] == "input"


def test_mixed_input_after_a_leaked_cast_is_located_at_the_cast():
    [finding] = dtypelint.audit(LeakyNorm().eval(), fp16(2, 4), dtype="float16").by_code("DT101")
    assert finding.location == ""  # the root module made the cast (x.float()) and did not cast back
    assert finding.message.startswith("<model> casts input x from float16 to float32 explicitly (aten._to_copy) "
                                      "and its result reaches aten.addmm in proj without a cast back")


class Adapter(nn.Module):
    """A float16 base linear with a float32 adapter (PEFT's convention), fed cast or uncast."""

    def __init__(self, cast_input: bool) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4).half()
        self.adapter = nn.Linear(4, 4, bias=False)
        self.unused = nn.Linear(4, 4, bias=False)
        self.cast_input = cast_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cast_input:
            return self.base(x) + self.adapter(x.float()).to(x.dtype)
        return self.base(x) + self.adapter(x)


def test_param_dtype_is_info_where_every_use_casts_and_where_nothing_reads_it():
    report = dtypelint.audit(Adapter(cast_input=True).eval(), fp16(2, 4), dtype="float16")
    findings = {f.location: f for f in report.by_code("DT105")}
    assert {location: f.severity for location, f in findings.items()} == {"adapter": "info", "unused": "info"}
    assert findings["adapter"].message.endswith("every use casts (an intended convention)")
    assert findings["unused"].message.endswith("the forward never reads it")


def test_param_dtype_is_a_warning_where_the_weight_meets_the_stream_uncast():
    report = dtypelint.audit(Adapter(cast_input=False).eval(), fp16(2, 4), dtype="float16")
    [finding] = [f for f in report.by_code("DT105") if f.location == "adapter"]
    assert finding.severity == "warning"
    assert finding.message.endswith("it meets another dtype at aten.mm without a cast")


def test_a_severity_override_keeps_what_the_rule_lowered():
    def severities(cast_input: bool) -> dict[str, str]:
        report = dtypelint.audit(Adapter(cast_input).eval(), fp16(2, 4), dtype="float16", select=["DT105"],
                                 severity={"DT105": "error"})
        return {f.location: f.severity for f in report.findings}

    assert severities(cast_input=True) == {"adapter": "info", "unused": "info"}
    assert severities(cast_input=False) == {"adapter": "error", "unused": "info"}


# DT107 intended-fp32 (mechanism 4) ---------------------------------------------------------------------------


class Rotary(nn.Module):
    """q * cos(positions * inv_freq): ``inv_freq`` stored in ``stored``, the angles computed in ``angles``."""

    def __init__(self, stored: torch.dtype, angles: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8).to(stored), persistent=False)
        self.angles = angles

    def forward(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        theta = positions.to(self.angles)[:, None] * self.inv_freq.to(self.angles)[None]
        return q * torch.cat([theta, theta], -1).cos().to(q.dtype)


class WithRotary(nn.Module):
    def __init__(self, stored: torch.dtype, angles: torch.dtype) -> None:
        super().__init__()
        self.rotary_emb = Rotary(stored, angles)

    def forward(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.rotary_emb(q, positions)


def dt107(stored: torch.dtype, angles: torch.dtype) -> list:
    inputs = (fp16(4, 8), torch.arange(2000, 2004))
    return dtypelint.audit(WithRotary(stored, angles).eval(), inputs, dtype="float16").by_code("DT107")


def test_intended_fp32_buffer_stored_in_half_is_a_warning_with_the_measured_error():
    [finding] = dt107(torch.bfloat16, torch.float32)
    assert (finding.category, finding.severity, finding.location, finding.tensor) == (
        "low-precision-op", "warning", "rotary_emb", "rotary_emb.inv_freq"
    )
    assert "rotary cos/sin are off by up to" in finding.message and "at position 4096" in finding.message


def test_angles_computed_in_half_are_a_warning_at_the_sin_cos():
    [finding] = dt107(torch.float32, torch.float16)
    assert (finding.location, finding.op, finding.tensor) == ("rotary_emb", "aten.cos", "rotary_emb.inv_freq")
    assert "aten.cos runs in float16 on angles" in finding.message


def test_float32_rotary_is_silent():
    assert dt107(torch.float32, torch.float32) == []


def test_rope_error_of_angles_computed_in_half_exceeds_storage_rounding():
    from dtypelint.rope import reference_inv_freq, rope_error

    inv_freq = reference_inv_freq(16)
    stored = rope_error(inv_freq, torch.bfloat16, 4096)
    assert 0 < stored < rope_error(inv_freq, torch.bfloat16, 4096, angles_in_dtype=True)
    assert rope_error(inv_freq, torch.float32, 4096) == 0


class Float32Rotary(nn.Module):
    """Olmo's rotary step: float32 cos/sin from ``inv_freq`` multiply the float16 query, the result is cast
    back (``cast_back``) or flows on in float32."""

    def __init__(self, cast_back: bool) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8).half()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8), persistent=False)
        self.cast_back = cast_back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x)
        angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        cos = torch.cat([angles, angles], -1).cos()
        rotated = q * cos + q
        return rotated.to(q.dtype) if self.cast_back else rotated


@pytest.mark.parametrize(("cast_back", "severity"), [(True, "info"), (False, "warning")])
def test_a_float32_rope_step_cast_back_is_intended_and_one_that_flows_on_is_not(cast_back, severity):
    report = dtypelint.audit(Float32Rotary(cast_back).eval(), torch.randn(1, 4, 8, dtype=torch.float16))
    (promotion,) = report.by_code("DT102")
    assert promotion.severity == severity and promotion.tensor == "inv_freq"
    assert ("an intended float32 step" in promotion.message) == cast_back
