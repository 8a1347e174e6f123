"""The generic rules DT101-DT106 on small real models: each one fires where it should and stays silent
where the same dtypes are fine."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, judged_silently, snapshot
from torch import nn

import dtypelint
from dtypelint.rules.base import Options

GENERIC = ("DT101", "DT102", "DT103", "DT104", "DT105", "DT106")



def fp16(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).half()


# DT102 promotion ----------------------------------------------------------------------------------------


class ScaledBlock(nn.Module):
    """A float16 block whose ``scale`` buffer was registered after ``.half()``: float32."""

    def __init__(self, buffer: str = "scale", shape: tuple[int, ...] = (16,)) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16).half()
        self.buffer = buffer
        self.register_buffer(buffer, torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x) * getattr(self, self.buffer)  # float16 * float32 -> float32
        x = torch.relu(x)  # 1
        x = x + 1  # 2
        x = x.sum(-1, keepdim=True)  # 3
        x = x.to(torch.float16)  # an explicit cast ends the widened stretch
        return x * 2  # float16 again: not counted


class Wrapper(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = ScaledBlock(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ExplicitFloat(nn.Module):
    """Casts the stream to float32 on purpose before using the float32 buffer, then casts back."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16).half()
        self.register_buffer("scale", torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).float() * self.scale
        return torch.relu(h).to(x.dtype)


def test_fp32_buffer_promoting_the_fp16_stream_is_one_promotion_warning():
    model = Wrapper().eval()
    before = snapshot(model)
    report = dtypelint.audit(model, fp16(2, 16))
    assert_unchanged(model, before)
    assert report.compute_dtype == "float16"
    [finding] = report.by_code("DT102")
    assert (finding.category, finding.severity, finding.location, finding.tensor, finding.op) == (
        "promotion", "warning", "block", "block.scale", "aten.mul"
    )
    assert finding.dtypes == ["float16", "float32"]
    assert "buffer block.scale (float32)" in finding.message
    assert "promotes the float16 stream to float32 at aten.mul" in finding.message
    # relu, add and sum run in float32; the explicit cast and the float16 mul after it do not count.
    assert "; 3 later ops then run in float32" in finding.message
    assert finding.fix is not None
    assert (finding.fix.tensors, finding.fix.to_dtype, finding.fix.safety) == (("block.scale",), "float16", "unsafe")


def test_zero_dim_fp32_buffer_does_not_promote():
    report = dtypelint.audit(Wrapper(shape=()).eval(), fp16(2, 16))
    assert judged_silently(report, "DT102")
    graph = report.graph
    mul = next(op for op in graph.ops() if graph.nodes[op]["name"] == "aten.mul")
    assert graph.nodes[graph.outputs(mul)[0]]["dtype"] == "float16"  # torch kept float16


def test_explicit_float_stream_is_not_promotion():
    report = dtypelint.audit(ExplicitFloat().eval(), fp16(2, 16))
    assert judged_silently(report, "DT102")
    assert judged_silently(report, "DT101")


def test_intended_fp32_buffer_of_the_pack_is_not_promotion(tmp_path):
    model = Wrapper(buffer="inv_freq").eval()
    x = fp16(2, 16)
    assert judged_silently(dtypelint.audit(model, x), "DT102")  # hf-eager: "*inv_freq" is float32 by design
    assert judged_silently(dtypelint.audit(model, x), "DT105")
    bare = tmp_path / "bare.toml"
    bare.write_text('[pack]\nname = "bare"\ndescription = "no intended-fp32"\n')
    [finding] = dtypelint.audit(model, x, backend=str(bare)).by_code("DT102")
    assert finding.tensor == "block.inv_freq"


# DT103 nonfinite / DT104 overflow-risk ------------------------------------------------------------------


class Mlp(nn.Module):
    """``up`` computes 4 * weight * 100 per output; ``down`` and the centring run after it."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.up = nn.Linear(4, 4).half()
        self.down = nn.Linear(4, 4).half()
        with torch.no_grad():
            self.up.weight.fill_(weight)
            self.up.bias.zero_()
            self.down.weight.fill_(1.0)
            self.down.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = h - h.mean(-1, keepdim=True)  # inf - inf: NaN, after the first overflow
        return self.down(h)


class MaskedScores(nn.Module):
    """Causal attention scores masked with a deliberate -inf (``masked_fill``) or finfo.min (``full``)."""

    def __init__(self, mask: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 4).half()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.proj(x)
        s = s @ s.transpose(-1, -2)
        causal = torch.ones(s.shape[-2:], dtype=torch.bool).triu(1)
        if self.mask == "masked_fill-inf":
            s = s.masked_fill(causal, float("-inf"))
        elif self.mask == "masked_fill-min":
            s = s.masked_fill(causal, torch.finfo(s.dtype).min)
        elif self.mask == "full-min":
            s = s + torch.full(s.shape[-2:], torch.finfo(s.dtype).min, dtype=s.dtype) * causal
        elif self.mask == "triu-inf":  # nn.Transformer.generate_square_subsequent_mask
            s = s + torch.triu(torch.full(s.shape[-2:], float("-inf"), dtype=s.dtype), diagonal=1)
        return torch.softmax(s.float(), -1).to(x.dtype)


class MaskThenOverflow(nn.Module):
    """A -inf causal mask (fine), then an MLP whose projection overflows float16 (not fine)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 4).half()
        with torch.no_grad():
            self.up.weight.fill_(300.0)
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x @ x.transpose(-1, -2)
        causal = torch.ones(s.shape[-2:], dtype=torch.bool).triu(1)
        p = torch.softmax(s.masked_fill(causal, float("-inf")).float(), -1).to(x.dtype)
        return self.up((p @ x) * 100)


HUNDREDS = torch.full((2, 4), 100.0, dtype=torch.float16)


def test_first_overflowing_op_is_one_nonfinite_error_with_input_ranges():
    report = dtypelint.audit(Mlp(300.0).eval(), HUNDREDS)  # 4 * 300 * 100 = 120000 > 65504
    [finding] = report.by_code("DT103")  # the NaN of the centring and of down is not reported again
    assert (finding.category, finding.severity, finding.location, finding.op) == (
        "nonfinite", "error", "up", "aten.addmm"
    )
    assert finding.dtypes == ["float16"]
    assert "aten.addmm produced non-finite values (float16 range [inf, inf]) from finite inputs" in finding.message
    assert "input x float16 [100, 100]" in finding.message
    assert "parameter up.weight float16 [300, 300]" in finding.message  # the weight's range is what overflows
    assert finding.message.endswith("ways out: keep up in float32, run in bfloat16 (float32's range), or "
                                    "`dtypelint precision` finds the fewest modules to keep in float32, verified "
                                    "by a forward")


class ConstantRowNorm(nn.Module):
    """A float16 LayerNorm of a constant row: its saved rstd is inf, which nothing reads or returns
    (DeiT's masked-image-modeling head in the family sweep)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8, eps=1e-12).half()
        self.proj = nn.Linear(8, 8).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def test_an_inf_in_a_by_product_the_forward_does_not_return_is_not_nonfinite():
    report = dtypelint.audit(ConstantRowNorm().eval(), torch.zeros(2, 8).half())
    norm = next(op for op in report.graph.ops() if report.graph.op(op)["name"] == "aten.native_layer_norm")
    assert any(report.graph.value_range(t) == (float("inf"), float("inf")) for t in report.graph.outputs(norm))
    assert judged_silently(report, "DT103")


def test_nonfinite_needs_value_statistics():
    report = dtypelint.audit(Mlp(300.0).eval(), HUNDREDS, stats=False)
    assert report.by_code("DT103") == report.by_code("DT104") == []
    assert "DT103" not in report.judged and "DT104" not in report.judged  # they did not run at all


@pytest.mark.parametrize("mask", ["masked_fill-inf", "masked_fill-min", "full-min"])
def test_deliberate_mask_values_are_neither_nonfinite_nor_overflow_risk(mask):
    report = dtypelint.audit(MaskedScores(mask).eval(), fp16(3, 4))
    graph = report.graph
    assert any(graph.nodes[op]["name"] in ("aten.masked_fill", "aten.full") for op in graph.ops())
    assert judged_silently(report, "DT103")
    assert judged_silently(report, "DT104")


def test_triu_of_a_minus_inf_fill_is_a_deliberate_mask():
    report = dtypelint.audit(MaskedScores("triu-inf").eval(), fp16(3, 4))
    assert judged_silently(report, "DT103")


def test_overflow_after_a_minus_inf_mask_is_still_reported():
    report = dtypelint.audit(MaskThenOverflow().eval(), torch.ones(3, 4, dtype=torch.float16))
    assert [(f.location, f.op) for f in report.by_code("DT103")] == [("up", "aten.addmm")]


def test_values_past_half_of_fp16_range_are_an_overflow_risk_warning():
    report = dtypelint.audit(Mlp(100.0).eval(), HUNDREDS)  # 4 * 100 * 100 = 40000: 61% of 65504
    assert judged_silently(report, "DT103")
    [finding] = report.by_code("DT104")  # the centring and down carry no new extreme: one finding
    assert (finding.category, finding.severity, finding.location, finding.op) == (
        "overflow-risk", "warning", "up", "aten.addmm"
    )
    assert finding.dtypes == ["float16"]
    assert finding.message == "aten.addmm produced values up to 4e+04, 61% of float16's largest value 65504"


def test_overflow_fraction_option_raises_the_threshold():
    report = dtypelint.audit(Mlp(100.0).eval(), HUNDREDS, options=Options(overflow_fraction=0.9))
    assert judged_silently(report, "DT104")
    report = dtypelint.audit(Mlp(100.0).eval(), HUNDREDS, options=Options(overflow_fraction=0.6))
    assert len(report.by_code("DT104")) == 1


# DT105 param-dtype --------------------------------------------------------------------------------------


class Fp32Norms(nn.Module):
    """A float16 model with two float32 LayerNorms (torch's CPU layer_norm accepts them), an integer
    buffer and a plain float32 tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 16).half()
        self.out = nn.Linear(16, 16).half()
        self.norm = nn.LayerNorm(16)
        self.post_norm = nn.LayerNorm(16)
        self.register_buffer("positions", torch.arange(16))
        self.offset = torch.zeros(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_norm(self.out(self.norm(self.lin(x))))


def test_fp32_modules_in_an_fp16_model_are_one_param_dtype_warning_each():
    report = dtypelint.audit(Fp32Norms().eval(), fp16(2, 16))
    assert report.graph.graph["error"] is None
    assert judged_silently(report, "DT101") and judged_silently(report, "DT102")
    findings = report.by_code("DT105")
    assert [f.location for f in findings] == ["norm", "post_norm"]
    finding = findings[0]
    assert (finding.category, finding.severity, finding.tensor, finding.op) == (
        "param-dtype", "warning", "norm.weight", None
    )
    assert finding.dtypes == ["float16", "float32"]
    # Issue #12, mechanism 6: the message says where the tensor meets the stream without a cast.
    assert finding.message == ("norm holds weight float32, bias float32 in a float16 model; it meets another "
                               "dtype at aten.native_layer_norm without a cast")
    assert finding.fix is not None
    assert finding.fix.tensors == ("norm.weight", "norm.bias")
    assert (finding.fix.to_dtype, finding.fix.safety) == ("float16", "unsafe")
    # Neither the int64 buffer nor the tensor attribute is a parameter-dtype problem.
    assert not any("positions" in f.message or "offset" in f.message for f in findings)


def test_keep_in_fp32_modules_are_not_reported():
    model = Fp32Norms().eval()
    model._keep_in_fp32_modules = ["norm"]
    findings = dtypelint.audit(model, fp16(2, 16)).by_code("DT105")
    assert [f.location for f in findings] == ["post_norm"]  # whole path components only, as transformers


def test_fp32_model_audited_as_fp32_has_no_param_dtype_findings():
    model = Fp32Norms().float().eval()
    report = dtypelint.audit(model, torch.randn(2, 16), dtype="float32")
    assert report.compute_dtype == "float32"
    assert [f for f in report.findings if f.code in GENERIC] == []


# DT106 low-precision-op ---------------------------------------------------------------------------------


class Scores(nn.Module):
    def __init__(self, softmax_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8).half()
        self.softmax_dtype = softmax_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.q(x)
        if self.softmax_dtype is None:
            return torch.softmax(s, -1)
        return torch.softmax(s, -1, dtype=self.softmax_dtype).to(s.dtype)


class Layers(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Scores(**kwargs), Scores(**kwargs)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class HalfRmsNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_fp16_softmax_is_one_low_precision_info():
    torch.manual_seed(0)
    report = dtypelint.audit(Scores().eval(), fp16(2, 8))
    [finding] = report.by_code("DT106")
    assert (finding.category, finding.severity, finding.location, finding.op) == (
        "low-precision-op", "info", "", "aten._softmax"
    )
    assert finding.dtypes == ["float16"]
    assert finding.message == "aten._softmax runs in float16 (numerically sensitive) in 1 place"
    assert finding.fix is None


def test_softmax_computed_in_fp32_is_silent():
    torch.manual_seed(0)
    report = dtypelint.audit(Scores(torch.float32).eval(), fp16(2, 8))
    assert judged_silently(report, "DT106")
    assert judged_silently(dtypelint.audit(Layers(softmax_dtype=torch.float32).eval(), fp16(2, 8)), "DT106")


def test_identical_layers_are_grouped_into_one_finding():
    report = dtypelint.audit(Layers().eval(), fp16(2, 8))
    [finding] = report.by_code("DT106")
    assert (finding.location, finding.op) == ("layers.*", "aten._softmax")
    assert finding.message.endswith("in 2 places")


def test_identical_layers_of_a_root_sequential_are_grouped():
    torch.manual_seed(0)
    report = dtypelint.audit(nn.Sequential(Scores(), Scores()).eval(), fp16(2, 8))
    assert [(f.location, f.message.endswith("in 2 places")) for f in report.by_code("DT106")] == [("*", True)]


def test_fp16_mean_of_a_square_is_the_variance_of_a_norm():
    torch.manual_seed(0)
    [finding] = dtypelint.audit(HalfRmsNorm().eval(), fp16(2, 8)).by_code("DT106")
    assert (finding.severity, finding.location, finding.op) == ("info", "", "aten.mean")
    assert "runs in float16 (variance of a norm)" in finding.message


def test_large_reduction_option():
    class Sum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8).half()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x).sum()

    x = fp16(2, 8)
    assert judged_silently(dtypelint.audit(Sum().eval(), x), "DT106")  # 16 elements < 65536
    [finding] = dtypelint.audit(Sum().eval(), x, options=Options(large_reduction=10)).by_code("DT106")
    assert "aten.sum runs in float16 (reduction over 16 elements)" in finding.message


# The tiny Llama and autocast: nothing to report -----------------------------------------------------------


def test_tiny_fp16_llama_has_no_generic_findings(tiny_llama_fp16, input_ids):
    report = dtypelint.audit(tiny_llama_fp16, {"input_ids": input_ids})
    graph = report.graph
    # float32 inv_freq is there (RoPE by design), and so are the float16 softmax/norm sites upcast in fp32.
    assert graph.nodes[graph.find_tensor("model.rotary_emb.inv_freq")]["dtype"] == "float32"
    assert [f for f in report.findings if f.code in GENERIC] == []


class Fp32Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x))) @ self.a.weight


def test_stray_fp32_head_is_mixed_input_but_not_under_autocast(stray_fp32_layer):
    x = fp16(2, 16)
    [finding] = dtypelint.audit(stray_fp32_layer, x).by_code("DT101")
    assert (finding.category, finding.severity, finding.location, finding.tensor, finding.op) == (
        "mixed-input", "error", "head", "head.weight", "aten.addmm"
    )
    assert "aten.addmm needs one dtype but receives" in finding.message
    # Autocast casts every operand of the same model's matmuls to bfloat16: nothing is mixed any more.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = dtypelint.audit(stray_fp32_layer, x)
    assert report.graph.graph["error"] is None
    assert judged_silently(report, "DT101")


def test_autocast_bf16_run_has_no_mixed_input(tiny_llama_fp16, input_ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block = dtypelint.audit(Fp32Block().eval(), torch.randn(2, 8))
        llama = dtypelint.audit(tiny_llama_fp16.float(), {"input_ids": input_ids})
    for report in (block, llama):
        graph = report.graph
        matmuls = [op for op in graph.ops() if graph.nodes[op]["name"] in ("aten.addmm", "aten.mm")]
        assert matmuls and all(
            {graph.nodes[t]["dtype"] for t in graph.floating_inputs(op)} == {"bfloat16"} for op in matmuls
        )
        assert judged_silently(report, "DT101")
    # The bfloat16 layer_norm with float32 weight is a dtype conflict, but not one its kernel refuses.
    conflicts = [block.graph.nodes[op]["name"] for op in block.graph.dtype_conflicts()]
    assert "aten.native_layer_norm" in conflicts


# Selection ---------------------------------------------------------------------------------------------


def test_select_and_severity_apply_to_generic_rules():
    x = fp16(2, 16)
    full = dtypelint.audit(Wrapper().eval(), x)
    assert {f.code for f in full.findings} == {"DT102", "DT105"}
    only = dtypelint.audit(Wrapper().eval(), x, select=["DT102"])
    assert [(f.code, f.category, f.severity) for f in only.findings] == [("DT102", "promotion", "warning")]
    louder = dtypelint.audit(Wrapper().eval(), x, severity={"promotion": "error"})
    assert {f.code: f.severity for f in louder.findings} == {"DT102": "error", "DT105": "warning"}


# DT103 and issue #12, mechanism 5: non-finite values that matter -------------------------------------------


class OverflowThen(nn.Module):
    """``up`` overflows float16; then T5's clamp, or a float32 softmax whose NaN returns to float16."""

    def __init__(self, after: str) -> None:
        super().__init__()
        self.up = nn.Linear(4, 4).half()
        with torch.no_grad():
            self.up.weight.fill_(300.0)
            self.up.bias.zero_()
        self.after = after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.after == "clamp":
            return torch.clamp(h, -6e4, 6e4)
        return torch.softmax(h.float(), -1).to(h.dtype)


class Fp32Region(nn.Module):
    """Finite float16 values that overflow only inside an unmeasured float32 region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * 1e4).to(x.dtype) + x


def test_an_inf_clamped_later_is_not_a_finding():
    assert judged_silently(dtypelint.audit(OverflowThen("clamp").eval(), HUNDREDS), "DT103")


def test_a_nan_made_in_unmeasured_float32_from_an_inf_names_only_the_inf():
    report = dtypelint.audit(OverflowThen("softmax").eval(), HUNDREDS)
    assert [(f.location, f.op, f.severity) for f in report.by_code("DT103")] == [("up", "aten.addmm", "error")]


def test_an_origin_behind_unmeasured_inputs_is_a_likely_origin_warning():
    [finding] = dtypelint.audit(Fp32Region().eval(), HUNDREDS * 100, dtype="float16").by_code("DT103")
    assert (finding.op, finding.severity) == ("aten._to_copy", "warning")
    assert "from inputs not measured (the values measured before them are finite" in finding.message


# DT102 where no leaf is behind the promotion: an activation cast to float32 on purpose ----------------------


class GatedBlock(nn.Module):
    """A router whose float32 gate (``scores.float().softmax``, as MoE routers compute it) scales the stream:
    without the cast back the block and everything after it run in float32, up to the model's output."""

    def __init__(self, ending: str) -> None:
        super().__init__()
        self.gate, self.up, self.ending = nn.Linear(16, 4), nn.Linear(16, 16), ending

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.gate(x).float().softmax(-1).max(-1, keepdim=True).values
        if self.ending == "cast-back":
            weight = weight.to(x.dtype)
        scaled = self.up(x) * weight
        if self.ending == "top-k":  # the float32 scores only choose indices: nothing wide flows on
            return x[..., scaled.topk(4, dim=-1).indices[0]]
        return scaled


class Gated(nn.Module):
    def __init__(self, ending: str) -> None:
        super().__init__()
        self.block = GatedBlock(ending)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x + self.block(x)) * 3


def test_a_float32_step_that_flows_on_to_the_output_is_where_the_stream_leaves_the_compute_dtype():
    [finding] = dtypelint.audit(Gated("leaks").eval().half(), fp16(2, 16)).by_code("DT102")
    assert (finding.location, finding.op, finding.tensor, finding.fix) == ("block", "aten.mul", None, None)
    assert finding.message.startswith("the float16 stream leaves float16 at aten.mul in block: ")
    assert "cast to float32 by aten._to_copy in block" in finding.message
    assert finding.message.endswith("and the model returns float32")


@pytest.mark.parametrize("ending", ["cast-back", "top-k"])
def test_a_float32_step_cast_back_or_ending_in_indices_is_the_convention(ending):
    report = dtypelint.audit(Gated(ending).eval().half(), fp16(2, 16))
    assert judged_silently(report, "DT102")


class RebuiltTable(nn.Module):
    """A position table the forward rebuilds in float32 when the input outgrows it, stored as its buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(4, 16, dtype=torch.float16), persistent=False)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.table.shape[0]:
            self.table = torch.arange(x.shape[0] * 16, dtype=torch.float32).reshape(-1, 16) / 100
        return self.proj(x) + self.table[: x.shape[0]]


def test_a_constant_the_forward_stores_as_a_buffer_is_named_by_that_buffer_in_dt102():
    [finding] = dtypelint.audit(RebuiltTable().half().eval(), fp16(8, 16)).by_code("DT102")
    assert (finding.location, finding.tensor) == ("", "table")
    assert finding.message.startswith("buffer table (assigned in forward")


# DT101 with an integer operand --------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """A float16 linear over a timestep the caller left int64: CPU and CUDA raise, fake tensors do not."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8).half()

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.linear(timestep[:, None].expand(-1, 4))


@pytest.mark.parametrize("mode", ["value", "meta"])
def test_an_integer_operand_at_a_one_dtype_kernel_is_a_mixed_input_in_both_modes(mode):
    model = TimestepEmbedding().eval()
    (error,) = dtypelint.audit(model, torch.tensor([10, 20]), mode=mode).by_code("DT101")
    assert error.dtypes == ["float16", "int64"] and "input timestep int64" in error.message
    floated = dtypelint.audit(model, torch.tensor([10.0, 20.0]).half(), mode=mode)
    assert judged_silently(floated, "DT101")


def test_an_integer_operand_elsewhere_is_no_mixed_input():
    """``x * step`` with an int64 step promotes to the float dtype: nothing needs one dtype there."""

    class Scaled(nn.Module):
        def forward(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
            return torch.relu(x * step)

    report = dtypelint.audit(Scaled(), {"x": fp16(2, 4), "step": torch.tensor(3)}, mode="meta")
    assert report.by_code("DT101") == []


class DeepMlp(nn.Module):
    """``Mlp`` where a decoder layer sits: its names are longer than a narrow message column."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleDict({"layers": nn.ModuleList([Mlp(300.0)])})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model["layers"][0](x)


def test_a_wrapped_message_never_splits_a_name_or_a_range():
    report = dtypelint.audit(DeepMlp().eval(), HUNDREDS)
    [finding] = report.by_code("DT103")
    assert "parameter model.layers.0.up.weight float16 [300, 300]" in finding.message
    lines = report.table(message_width=16).splitlines()
    assert any("model.layers.0.up.weight" in line for line in lines)  # whole, though wider than the column
    assert any("[300, 300]" in line for line in lines) and any("[inf, inf]" in line for line in lines)
