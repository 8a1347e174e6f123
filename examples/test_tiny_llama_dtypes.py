"""Dtype tests for a model, as a user of the dtypelint pytest plugin writes them.

    pytest examples/test_tiny_llama_dtypes.py

The plugin comes with dtypelint (the ``pytest11`` entry point): nothing to import, the ``dtypelint``
fixture is there. The model is the shipped 2-layer Llama (examples/tiny-llama), loaded the way
transformers users load a checkpoint for inference: ``from_pretrained(path, dtype=torch.float16)``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_LLAMA = Path(__file__).resolve().parent / "tiny-llama"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float16).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))


def test_hf_eager_is_clean(dtypelint, model, input_ids):
    """The plain transformers forward: no finding at or above error (the default fail level)."""
    dtypelint.assert_clean(model, input_ids, backend="hf-eager")


@pytest.mark.dtypelint(backend="ipex-llm-xpu", dtype="float16", fail_on="warning")
def test_ipex_llm_xpu_is_clean(dtypelint, model, input_ids):
    """The ipex-llm XPU kernels' contracts. transformers 5 keeps one model-level rotary embedding whose
    float32 inv_freq is intended, so not even a warning is expected. The marker sets this test's
    defaults; keyword arguments of assert_clean would override them."""
    report = dtypelint.assert_clean(model, input_ids)
    assert report.backend == "ipex-llm-xpu"


@pytest.mark.parametrize("backend", ["hf-eager", "ipex-llm-xpu"])
def test_report_for_each_backend(dtypelint, model, input_ids, backend):
    """audit() returns the report to make assertions of your own."""
    report = dtypelint.audit(model, input_ids, backend=backend, dtype="float16")
    assert report.compute_dtype == "float16"
    assert not report.at_or_above("warning"), report.render()


def test_a_stray_float32_layer_is_caught(dtypelint, model, input_ids):
    """What a regression looks like: one projection left in float32 after a custom ``.half()``."""
    import copy

    broken = copy.deepcopy(model)
    broken.lm_head.float()
    report = dtypelint.audit(broken, input_ids)
    assert {finding.code for finding in report.findings} >= {"DT101"}
    assert any(finding.tensor == "lm_head.weight" for finding in report.findings)
