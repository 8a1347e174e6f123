"""Every attack leaves the process and the shipped checkpoints as it found them: checked around each test
of the attack tables, by a snapshot of its own (not dtypelint's), so the check is independent of the code
it checks."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _settings() -> dict[str, Any]:
    """Process-wide settings a forward, a loader or the command line could leave changed."""
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    return {
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "default device": torch.get_default_device(),
        "torch function modes": torch._C._len_torch_function_stack(),
        "threads": torch.get_num_threads(),
        "matmul precision": torch.get_float32_matmul_precision(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "anomaly": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "cpu autocast": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        "tf32": (cuda.matmul.allow_tf32, cudnn.allow_tf32),
        "sdp": (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled()),
        "cudnn": (cudnn.benchmark, cudnn.deterministic, cudnn.enabled),
        "warnings": list(warnings.filters),
        "environment": {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"},
        "sys.path": list(sys.path),
        "logging disabled": logging.root.manager.disable,
    }


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="session")
def _shipped_checkpoints() -> dict[str, str]:
    return _tree_hashes(EXAMPLES)


@pytest.fixture(scope="session")
def _warm_imports(tiny_llama_path: Path) -> None:
    """One audit and one check before the first snapshot: torch imports sympy and inductor lazily, once per
    process, and they add a warnings filter and ``TORCHINDUCTOR_CACHE_DIR``. That is torch's doing, not a
    forward's; every later change is dtypelint's."""
    from dtypelint.cli import main

    main(["check", str(tiny_llama_path), "--format", "json", "--exit-zero"])
    main(["check", str(tiny_llama_path), "--mode", "meta", "--format", "json", "--exit-zero"])


@pytest.fixture(autouse=True)
def leaves_process_and_examples_unchanged(_shipped_checkpoints: dict[str, str], _warm_imports: None) -> Iterator[None]:
    before = _settings()
    yield
    after = _settings()
    changed = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    assert not changed, f"the test left process settings changed: {changed}"
    assert _tree_hashes(EXAMPLES) == _shipped_checkpoints, "the shipped examples changed"
