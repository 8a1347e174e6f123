"""benchmarks/cuda_probe.py without a GPU: it exits with one line, and its CPU predictions are the measured facts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROBE = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_probe.py"
# What the H100 did (shared/reference/cuda-dtype-facts.md): True = raised.
MEASURED = {
    "layer_norm fp16 input, fp32 weight": True,
    "group_norm bf16 input, fp32 weight": True,
    "layer_norm fp16 input, fp16 weight": False,
    "sdpa fp16 q, fp32 mask, head_dim 64": False,
    "sdpa fp16 q, fp32 mask, head_dim 512": True,
    "sdpa fp32 q, fp32 mask, head_dim 512": False,
    "sdpa fp32, forced flash": True,
    "sdpa fp16, forced flash": False,
    "sdpa fp16 + mask, forced flash": True,
    "sdpa fp16 + fp32 mask, forced efficient": True,
}


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("cuda_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_cuda_the_probe_says_so_in_one_line_and_exits_0():
    done = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert done.stdout.strip().count("\n") == 0 and "CUDA is not available" in done.stdout


def test_the_probes_cpu_predictions_are_the_measured_facts(probe):
    scenarios = {scenario.name: scenario for scenario in probe.SCENARIOS}
    assert MEASURED.keys() <= scenarios.keys()
    for name, raised in MEASURED.items():
        assert probe.predicted(scenarios[name])["outcome"] == ("raised" if raised else "ran"), name
