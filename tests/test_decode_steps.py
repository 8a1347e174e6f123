"""Defects of the second call: a generative model is traced on the prompt and then on a decode step fed the
token it predicted and the cache it returned, as ``generate`` runs it (``Options.steps``, ``--steps``)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import per_layer_rotary
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

import dtypelint
from dtypelint.cli import main


class TinyDecoder(nn.Module):
    """One attention head over a cache it returns as a tuple (the legacy cache of transformers < 4.45)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.k, self.head = nn.Embedding(32, 16), nn.Linear(16, 16), nn.Linear(16, 32)

    def forward(self, input_ids: torch.Tensor, past_key_values: tuple | None = None, use_cache: bool = True,
                attention_mask: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        x = self.embed(input_ids)
        keys = self.k(x)
        if past_key_values is not None:
            keys = torch.cat([past_key_values[0], keys], dim=1)
        scores = torch.softmax(x @ keys.transpose(1, 2), dim=-1)
        return CausalLMOutputWithPast(logits=self.head(scores @ keys), past_key_values=(keys,))


def fp32_outputs(model: nn.Module) -> nn.Module:
    """What accelerate's ``convert_outputs_to_fp32`` does to a mixed-precision model's forward: every
    returned tensor, the cache too, made float32."""
    forward = model.forward

    def converted(*args, **kwargs):
        output = forward(*args, **kwargs)
        return CausalLMOutputWithPast(logits=output.logits.float(),
                                      past_key_values=tuple(t.float() for t in output.past_key_values))

    model.forward = converted
    return model


PROMPT = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}


def test_a_cache_returned_in_another_dtype_is_caught_on_the_decode_step_it_breaks():
    model = fp32_outputs(TinyDecoder().half().eval())
    assert dtypelint.audit(model, PROMPT, options={"steps": 1}).errors == []  # the prompt alone is clean
    report = dtypelint.audit(model, PROMPT)
    assert {error.code for error in report.errors} == {"DT001", "DT101"}  # bmm of the float32 cache and float16 q
    for error in report.errors:
        assert error.message.endswith("(in decode step 1)") and "activation from aten.cat float32" in error.message
    assert report.steps == 2


def test_the_same_model_returning_its_cache_as_computed_is_clean_on_every_step():
    report = dtypelint.audit(TinyDecoder().half().eval(), PROMPT, options={"steps": 3})
    assert report.at_or_above("warning") == []
    steps = {report.graph.op(op)["step"] for op in report.graph.ops()}
    assert steps == {0, 1, 2}
    assert report.steps == 3


def test_a_decode_step_repeats_no_finding_of_the_prompt(tiny_llama_fp16, input_ids):
    model = per_layer_rotary(tiny_llama_fp16)  # IPX101 at every layer's rotary, on every step

    def audited(steps: int) -> dtypelint.Report:
        return dtypelint.audit(model, {"input_ids": input_ids}, backend="ipex-llm-xpu", options={"steps": steps})

    prompt, both = audited(1), audited(2)
    assert prompt.by_code("IPX101") and both.findings == prompt.findings  # the same defects, once
    assert (prompt.steps, both.steps) == (1, 2)
    assert {both.graph.op(op)["step"] for op in both.graph.ops()} == {0, 1}


def test_steps_on_the_command_line(tiny_llama_path, capsys):
    for steps in (1, 2, 3):
        assert main(["check", str(tiny_llama_path), "--steps", str(steps), "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["steps"] == steps


@pytest.mark.parametrize("model", [nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU())])
def test_a_model_without_a_cache_is_traced_once(model):
    report = dtypelint.audit(model.eval(), torch.randn(2, 4))
    assert {report.graph.op(op)["step"] for op in report.graph.ops()} == {0} and report.steps == 1


def test_a_decode_step_is_prepared_by_the_models_own_generation_code():
    """CpmAnt's forward slices the cached prefix off ``input_ids`` itself, so generate feeds it the whole
    sequence: a step of the last token alone raised a size mismatch that generate never meets."""
    config = transformers.CpmAntConfig(vocab_size=256, hidden_size=64, num_attention_heads=4, dim_head=16,
                                       dim_ff=128, num_hidden_layers=2, prompt_length=4)
    model = transformers.CpmAntForCausalLM(config).half().eval()
    for mode in ("value", "meta"):
        report = dtypelint.audit(model, PROMPT, mode=mode, options={"steps": 3})
        assert report.steps == 3 and not report.by_code("DT001") and not report.by_code("DT002")
        assert {report.graph.op(op)["step"] for op in report.graph.ops()} == {0, 1, 2}


class ShortCacheDecoder(TinyDecoder):
    """A forward that refuses a cache longer than its window, as some models' cache code does: the error is
    about shapes, and dtypelint's decode step, not the model's dtypes, is what it refuses."""

    def forward(self, input_ids, past_key_values=None, use_cache=True, attention_mask=None):
        if past_key_values is not None:
            # the cached keys in float32 meet the float16 new ones in a shape error, not a dtype error
            torch.add(past_key_values[0].float(), self.embed(input_ids).expand(-1, 3, -1))
        return super().forward(input_ids, past_key_values, use_cache, attention_mask)


def test_a_decode_step_refused_for_shapes_is_a_trace_limit_not_a_defect():
    report = dtypelint.audit(ShortCacheDecoder().half().eval(), PROMPT)
    assert report.errors == []  # not DT001, and not DT101 for the float32/float16 add that raised
    (limit,) = report.by_code("DT002")
    assert "which is not a dtype error" in limit.message and limit.message.endswith("(in decode step 1)")
    assert "the prompt was checked" in limit.message and report.steps == 2
    assert report.judged["DT101"] > 0  # the prompt's ops were judged


def test_a_prompt_that_raises_for_shapes_is_still_a_forward_error_but_not_a_dtype_mix():
    model = nn.Sequential(nn.Linear(4, 4)).half().eval()
    model.register_forward_hook(lambda _, args, out: torch.add(out.float(), args[0][:, :3]))
    report = dtypelint.audit(model, torch.randn(2, 4, dtype=torch.float16))
    assert [error.code for error in report.errors] == ["DT001"]


class DataDependentStepDecoder(TinyDecoder):
    """A decode step that reads a tensor's value (``.item()``), as ProphetNet's does: meta mode cannot."""

    def forward(self, input_ids, past_key_values=None, use_cache=True, attention_mask=None):
        if past_key_values is not None and int(past_key_values[0].shape[1] * past_key_values[0].sum().ne(0).item()) < 0:
            raise AssertionError("unreachable")
        return super().forward(input_ids, past_key_values, use_cache, attention_mask)


def test_a_data_dependent_op_of_a_decode_step_in_meta_mode_is_meta_modes_limit():
    report = dtypelint.audit(DataDependentStepDecoder().half().eval(), PROMPT, mode="meta")
    (limit,) = report.by_code("DT002")
    assert limit.message.startswith("meta mode cannot run aten._local_scalar_dense")
    assert "not a dtype error" not in limit.message and report.errors == []
