from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import TINY_LLAMA, StrayFp32Layer
from torch import nn


@pytest.fixture(scope="session")
def tiny_llama_path() -> Path:
    return TINY_LLAMA


@pytest.fixture(scope="session")
def _tiny_llama_fp16() -> nn.Module:
    from transformers import AutoModelForCausalLM

    from dtypelint.load import dtype_keyword

    return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, **{dtype_keyword(): torch.float16}).eval()


@pytest.fixture
def tiny_llama_fp16(_tiny_llama_fp16: nn.Module) -> nn.Module:
    """The example Llama as ``from_pretrained(dtype=float16)`` loads it: a fresh copy per test."""
    return copy.deepcopy(_tiny_llama_fp16)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def stray_fp32_layer() -> nn.Module:
    torch.manual_seed(0)
    return StrayFp32Layer().eval()
