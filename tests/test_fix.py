"""dtypelint.fix: targeted casts, verification with rollback, measured cost, plans, fixed checkpoints."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from helpers import assert_unchanged, per_layer_rotary, snapshot
from torch import nn

import dtypelint
from dtypelint import FixPlan, LoadError, UsageError
from dtypelint.formats.fix import fix_text
from dtypelint.plan import Change
from dtypelint.rope import rope_error
from dtypelint.save import PLAN_FILE


def test_safe_fix_casts_only_what_findings_name_and_keeps_identity(stray_fp32_layer):
    x = torch.randn(2, 16, dtype=torch.float16)
    weight = stray_fp32_layer.head.weight
    untouched = {name: t.clone() for name, t in stray_fp32_layer.body.state_dict().items()}
    result = dtypelint.fix(stray_fp32_layer, inputs=x)
    assert [c.tensor for c in result.changed] == ["head.weight", "head.bias"]
    assert stray_fp32_layer.head.weight is weight and isinstance(weight, nn.Parameter) and weight.requires_grad
    assert weight.dtype == torch.float16
    for name, tensor in stray_fp32_layer.body.state_dict().items():
        assert torch.equal(tensor, untouched[name])
    assert result.after.errors == [] and not result.rolled_back
    assert stray_fp32_layer(x).dtype == torch.float16
    text = fix_text(result)
    assert "head.weight" in text and "float32 -> float16" in text and str(result) == result.summary_line()


def test_unsafe_fixes_need_opting_in_and_dry_run_changes_nothing(tiny_llama_fp16, input_ids):
    model = per_layer_rotary(tiny_llama_fp16)
    inputs = {"input_ids": input_ids}
    before = snapshot(model)
    safe_only = dtypelint.fix(model, inputs=inputs, backend="ipex-llm-xpu")
    assert safe_only.plan.changes == [] and safe_only.summary_line() == "no fix to apply"
    dry = dtypelint.fix(model, inputs=inputs, backend="ipex-llm-xpu", unsafe=True, dry_run=True)
    assert [c.tensor for c in dry.plan.changes] == [
        "model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.1.self_attn.rotary_emb.inv_freq"
    ]
    assert not dry.applied and "dry run" in dry.summary_line()
    assert_unchanged(model, before)


def test_unsafe_rotary_fix_is_targeted_verified_and_measured(tiny_llama_fp16, input_ids):
    model = per_layer_rotary(tiny_llama_fp16)
    before = snapshot(model)
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    result = dtypelint.fix(model, inputs={"input_ids": input_ids}, backend="ipex-llm-xpu", unsafe=True)
    assert result.applied and not result.rolled_back
    assert result.after.errors == [] and [f for f in result.after.findings if f.severity == "warning"] == []
    changed = {c.tensor for c in result.changed}
    assert changed == {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)}
    after = snapshot(model)
    for name, tensor in before["state"].items():
        if name not in changed:
            assert torch.equal(after["state"][name], tensor), name
            assert after["state"][name].dtype == tensor.dtype
    # The model-level inv_freq (what transformers 5 actually reads) stays float32: only what the kernel needs.
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.layers[0].self_attn.rotary_emb._non_persistent_buffers_set == {"inv_freq", "original_inv_freq"}
    # Costs: outputs unchanged here (transformers 5 never reads per-layer buffers); RoPE error measured.
    assert result.output_change["IPX101"] == (0.0, 0.0)
    error = result.rope_error["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert 0 < error < 0.5
    assert error == pytest.approx(rope_error(inv_freq, torch.float16, 512))


def test_failed_verification_rolls_everything_back_bit_identically(stray_fp32_layer, monkeypatch):
    x = torch.randn(2, 16, dtype=torch.float16)
    report = dtypelint.audit(stray_fp32_layer, x)
    before = snapshot(stray_fp32_layer)
    storage = stray_fp32_layer.head.weight.data_ptr()
    real_audit = dtypelint.audit

    def audit_that_still_sees_the_problem(model, inputs, **options):
        return report  # as if the cast had not cured DT101

    monkeypatch.setattr(sys.modules["dtypelint.pipeline"], "audit", audit_that_still_sees_the_problem)
    result = dtypelint.fix(stray_fp32_layer, report, inputs=x)
    monkeypatch.setattr(sys.modules["dtypelint.pipeline"], "audit", real_audit)
    assert result.rolled_back and "DT101 still reported for head.weight" in result.reason
    assert stray_fp32_layer.head.weight.data_ptr() == storage  # the original storage, not a copy
    assert_unchanged(stray_fp32_layer, before)
    assert result.changed == []


def test_a_fix_that_introduces_an_error_is_rolled_back(stray_fp32_layer, monkeypatch):
    x = torch.randn(2, 16, dtype=torch.float16)
    report = dtypelint.audit(stray_fp32_layer, x)
    before = snapshot(stray_fp32_layer)
    new_error = dtypelint.Finding("DT103", "nonfinite", "error", "body.0", None, "aten.addmm", ["float16"], "inf")
    clean = dtypelint.Report(report.graph, [new_error], report.model, report.backend, report.mode, report.compute_dtype)
    monkeypatch.setattr(sys.modules["dtypelint.pipeline"], "audit", lambda model, inputs, **options: clean)
    result = dtypelint.fix(stray_fp32_layer, report, inputs=x)
    assert result.rolled_back and "introduced DT103 at body.0" in result.reason
    assert_unchanged(stray_fp32_layer, before)


def test_tied_weights_stay_tied():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)).half()
    model[1].weight = model[0].weight
    model[0].weight.data = model[0].weight.data.float()
    plan = FixPlan("Sequential", [Change("0.weight", "float32", "float16", "DT105", "", "unsafe")])
    dtypelint.apply_plan(model, plan)
    assert model[1].weight is model[0].weight and model[0].weight.dtype == torch.float16


def test_plan_round_trips_and_reapplies_after_a_fresh_load(tiny_llama_fp16, _tiny_llama_fp16, input_ids, tmp_path):
    model = per_layer_rotary(tiny_llama_fp16)
    result = dtypelint.fix(model, inputs={"input_ids": input_ids}, backend="ipex-llm-xpu", unsafe=True)
    path = result.plan.write(tmp_path / "fixes.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["changes"][0] == {
        "tensor": "model.layers.0.self_attn.rotary_emb.inv_freq", "from_dtype": "float32", "to_dtype": "float16",
        "code": "IPX101", "reason": data["changes"][0]["reason"], "safety": "unsafe",
    }
    fresh = per_layer_rotary(copy.deepcopy(_tiny_llama_fp16))
    changes = dtypelint.apply_plan(fresh, path)
    assert len(changes) == 2
    assert dtypelint.audit(fresh, {"input_ids": input_ids}, backend="ipex-llm-xpu").errors == []
    dtypelint.apply_plan(fresh, path)  # idempotent


def test_plan_naming_missing_tensors_is_refused_before_any_change(tiny_llama_fp16, tmp_path):
    plan = FixPlan("LlamaForCausalLM", [
        Change("lm_head.weight", "float16", "float32", "X", "", "unsafe"),
        Change("model.layers.9.self_attn.rotary_emb.inv_freq", "float32", "float16", "X", "", "unsafe"),
    ])
    with pytest.raises(UsageError, match="lacks: model.layers.9.self_attn.rotary_emb.inv_freq"):
        dtypelint.apply_plan(tiny_llama_fp16, plan)
    assert tiny_llama_fp16.lm_head.weight.dtype == torch.float16
    (tmp_path / "bad.json").write_text("{\"version\": 7}")
    with pytest.raises(LoadError, match="malformed"):
        dtypelint.apply_plan(tiny_llama_fp16, tmp_path / "bad.json")


def test_fixed_checkpoint_goes_to_a_new_directory_only(tiny_llama_fp16, tiny_llama_path, tmp_path):
    plan = FixPlan("LlamaForCausalLM", [])
    source_files = {p.name: p.read_bytes() for p in tiny_llama_path.iterdir()}
    with pytest.raises(UsageError, match="over its source"):
        dtypelint.save_fixed(tiny_llama_fp16, tiny_llama_path, plan, source=tiny_llama_path)
    target = dtypelint.save_fixed(tiny_llama_fp16, tmp_path / "fixed", plan, source=tiny_llama_path)
    assert (target / "config.json").is_file() and (target / PLAN_FILE).is_file()
    with pytest.raises(UsageError, match="not empty"):
        dtypelint.save_fixed(tiny_llama_fp16, target, plan)
    assert dtypelint.save_fixed(tiny_llama_fp16, target, plan, force=True) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed"]  # no staging left behind
    assert {p.name: p.read_bytes() for p in tiny_llama_path.iterdir()} == source_files


def test_fix_reaudits_as_the_report_was_made_without_repeating_inputs_or_backend(tiny_llama_fp16, input_ids):
    model = per_layer_rotary(tiny_llama_fp16)
    report = dtypelint.audit(model, {"input_ids": input_ids}, backend="ipex-llm-xpu", ignore=["DT106"])
    result = dtypelint.fix(model, report, unsafe=True)
    assert result.applied and not result.rolled_back
    assert result.after.backend == "ipex-llm-xpu" and result.after.compute_dtype == "float16"
    assert "backend ipex-llm-xpu" in result.summary_line()


def test_fix_without_inputs_or_of_a_meta_report_is_a_usage_error(stray_fp32_layer, tiny_llama_path):
    with pytest.raises(UsageError, match="needs the inputs"):
        dtypelint.fix(stray_fp32_layer)
    meta = dtypelint.audit_config(tiny_llama_path, backend="ipex-llm-xpu")
    with pytest.raises(UsageError, match="meta-mode report has no real weights"):
        dtypelint.fix(stray_fp32_layer, meta)


def test_one_cast_has_one_safety_whichever_finding_proposes_it(stray_fp32_layer):
    report = dtypelint.audit(stray_fp32_layer, torch.randn(2, 16, dtype=torch.float16))
    proposals = {}
    for finding in report.findings:
        for name in finding.fix.tensors if finding.fix else ():
            proposals.setdefault((name, finding.fix.to_dtype), set()).add((finding.code, finding.fix.safety))
    assert proposals[("head.weight", "float16")] == {("DT101", "safe"), ("DT105", "safe")}
    assert all(len({safety for _, safety in found}) == 1 for found in proposals.values())
    param_dtype = report.by_code("DT105")[0]
    assert "safe: DT101 shows the op cannot run without it" in param_dtype.fix.description


def test_a_cast_the_forward_never_reads_is_explained_next_to_its_zero_output_change(
    tiny_llama_fp16, input_ids, stray_fp32_layer
):
    model = per_layer_rotary(tiny_llama_fp16)  # transformers 5 reads the model-level rotary module only
    result = dtypelint.fix(model, inputs={"input_ids": input_ids}, backend="ipex-llm-xpu", unsafe=True)
    assert result.output_change["IPX101"] == (0.0, 0.0)
    assert result.unread == [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)]
    text = fix_text(result)
    assert "never read model.layers.0.self_attn.rotary_emb.inv_freq" in text
    assert "the cos/sin max error above is what it will see" in text
    read = dtypelint.fix(stray_fp32_layer, inputs=torch.randn(2, 16, dtype=torch.float16))
    assert read.changed and read.unread == [] and "never read" not in fix_text(read)
