"""The fix, end to end on the real ipex-llm flow: load_in_4bit -> save_low_bit -> load_low_bit(fp16)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import dtypelint
from dtypelint.cli import main
from dtypelint.formats.fix import fix_table
from dtypelint.save import PLAN_FILE

LOW_BIT = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama-low-bit"
# generate() of the fixed model against the model.half() workaround: same tokens, logits within this.
LOGIT_TOLERANCE = 1e-2


def load_low_bit(dtype=torch.float16):
    from ipex_llm.transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.load_low_bit(str(LOW_BIT), torch_dtype=dtype).eval()


@pytest.fixture
def inputs():
    return {"input_ids": torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))}


def generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack([score.float() for score in out.scores])


def test_unsafe_fix_casts_only_the_rotary_buffers_and_matches_the_half_workaround(inputs):
    model = load_low_bit()
    report = dtypelint.audit(model, inputs, backend="ipex-llm-xpu")
    assert {f.tensor for f in report.errors} == {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)}
    dtypes_before = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}

    result = dtypelint.fix(model, report, inputs=inputs, backend="ipex-llm-xpu", unsafe=True)

    assert result.applied and not result.rolled_back and result.after.errors == []
    changed = {name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.dtype != dtypes_before[name]}
    assert changed == {c.tensor for c in result.changed} == {f.tensor for f in report.errors}
    assert all(dtype == torch.float16 for name, dtype in dtypes_before.items() if name not in changed and dtype.is_floating_point)
    assert 0 < max(result.rope_error.values()) < 0.5
    assert "IPX101" in fix_table(result) and "cos/sin max error" in fix_table(result)

    fixed_tokens, fixed_scores = generate(model, inputs)
    workaround_tokens, workaround_scores = generate(load_low_bit().half(), inputs)
    assert torch.equal(fixed_tokens, workaround_tokens)
    assert (fixed_scores - workaround_scores).abs().max().item() <= LOGIT_TOLERANCE


def test_the_plan_reapplies_after_the_next_load_low_bit(inputs, tmp_path):
    model = load_low_bit()
    result = dtypelint.fix(model, inputs=inputs, backend="ipex-llm-xpu", unsafe=True)
    plan = result.plan.write(tmp_path / "fixes.json")
    reloaded = load_low_bit()
    assert dtypelint.audit(reloaded, inputs, backend="ipex-llm-xpu").errors  # the load undid nothing: no fix yet
    dtypelint.apply_plan(reloaded, plan)
    assert dtypelint.audit(reloaded, inputs, backend="ipex-llm-xpu").errors == []


def test_check_command_reproduces_the_seed_and_fixes_it(capsys, tmp_path):
    arguments = ["check", str(LOW_BIT), "--dtype", "float16", "--backend", "ipex-llm-xpu"]
    assert main(arguments) == 1
    out = capsys.readouterr().out
    assert "IPX101" in out and "model.layers.{0,1}.self_attn.rotary_emb (2x)" in out  # one cause, both layers
    assert "needs model.layers.{0,1}.self_attn.rotary_emb.inv_freq (float32)" in out
    assert main([*arguments, "--fix"]) == 1  # the fix is unsafe: not applied without --unsafe-fixes
    assert "no fix to apply" in capsys.readouterr().out
    plan = tmp_path / "plan.json"
    assert main([*arguments, "--fix", "--unsafe-fixes", "--write-plan", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "cast 2 tensors" in out and "0 errors" in out.splitlines()[-1]
    assert plan.is_file()


def test_save_fixed_writes_a_low_bit_checkpoint_that_load_low_bit_reads_back(inputs, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(LOW_BIT, source)
    target = tmp_path / "fixed"
    arguments = ["check", str(source), "--dtype", "float16", "--backend", "ipex-llm-xpu", "--fix", "--unsafe-fixes"]
    assert main([*arguments, "--save-fixed", str(target)]) == 0
    assert f"saved the fixed model and its fix plan to {target}" in capsys.readouterr().out
    assert {"config.json", "load_keys.json", PLAN_FILE} <= {p.name for p in target.iterdir()}

    from ipex_llm.transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.load_low_bit(str(target), torch_dtype=torch.float16).eval()
    # inv_freq is non-persistent: every load recomputes it in float32, so the plan beside it is re-applied.
    assert dtypelint.audit(reloaded, inputs, backend="ipex-llm-xpu").errors
    dtypelint.apply_plan(reloaded, target / PLAN_FILE)
    assert dtypelint.audit(reloaded, inputs, backend="ipex-llm-xpu").errors == []
    tokens, scores = generate(reloaded, inputs)
    workaround_tokens, workaround_scores = generate(load_low_bit().half(), inputs)
    assert torch.equal(tokens, workaround_tokens)
    assert (scores - workaround_scores).abs().max().item() <= LOGIT_TOLERANCE

    assert main(["check", str(target), *arguments[2:6]]) == 1  # the command loads it too, and says why it still fails
    assert f"{PLAN_FILE} holds a fix plan" in capsys.readouterr().out


def test_the_html_report_draws_the_rotary_contract_the_traced_forward_never_shows(capsys):
    """ipex-llm reads the per-layer inv_freq while it builds the model: no traced op uses it, so the page draws
    the contract itself, once for both layers."""
    assert main(["check", str(LOW_BIT), "--dtype", "float16", "--backend", "ipex-llm-xpu", "--format", "html",
                 "-q"]) == 1
    page = capsys.readouterr().out
    assert page.count('<pre class="mermaid">') == 1 and "Not drawn" not in page
    assert "inv_freq float32&quot;):::culprit" in page and "operands(&quot;query/key float16&quot;)" in page
    assert "xe_addons.rotary_half_inplaced (ipex-llm-xpu kernel)" in page
