"""Attack table: inputs that would make an audit's time or memory unbounded."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch import nn

import dtypelint
from dtypelint.cli import main
from dtypelint.config import load_settings
from dtypelint.rules.base import Options

ROOT = Path(__file__).resolve().parents[2]


class Loop(nn.Module):
    """``steps`` tiny ops (one aten.add each), then optionally a failing matmul."""

    def __init__(self, steps: int, fail: bool = False) -> None:
        super().__init__()
        self.steps, self.fail = steps, fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            x = x + 1
        if self.fail:
            x = x @ torch.ones(3, 3)
        return x


def _ops(report: dtypelint.Report) -> int:
    return sum(1 for _ in report.graph.ops())


def _audit_with_options(model: nn.Module, max_ops: int, tmp_path: Path) -> dtypelint.Report:
    return dtypelint.audit(model, torch.ones(2), options=Options(max_ops=max_ops))


def _audit_with_settings(model: nn.Module, max_ops: int, tmp_path: Path) -> dtypelint.Report:
    (tmp_path / "pyproject.toml").write_text(f"[tool.dtypelint]\nmax-ops = {max_ops}\n")
    return dtypelint.audit(model, torch.ones(2), settings=load_settings(tmp_path / "pyproject.toml"))


CAPPED_AUDITS = {"Options(max_ops=)": _audit_with_options, "[tool.dtypelint] max-ops": _audit_with_settings}


@pytest.mark.parametrize("how", list(CAPPED_AUDITS))
def test_past_max_ops_the_trace_only_counts_and_says_so(how, tmp_path) -> None:
    report = CAPPED_AUDITS[how](Loop(5000), 1000, tmp_path)
    assert _ops(report) == 1000
    assert report.graph.graph["ops_run"] == 5000 and report.graph.graph["ops_recorded"] == 1000
    [finding] = [f for f in report.findings if f.code == "DT002"]
    assert finding.severity == "warning"
    assert "5000 ops" in finding.message and "first 1000" in finding.message and "only that part" in finding.message


def test_the_forward_runs_on_past_the_cap_and_its_error_is_still_reported() -> None:
    report = dtypelint.audit(Loop(3000, fail=True), torch.ones(2), options=Options(max_ops=100))
    assert {f.code for f in report.findings} == {"DT001", "DT002"}
    assert "cannot be multiplied" in next(f.message for f in report.findings if f.code == "DT001")


def test_under_the_cap_nothing_changes() -> None:
    report = dtypelint.audit(Loop(50), torch.ones(2), options=Options(max_ops=50))
    assert _ops(report) == 50 and report.findings == []
    assert Options().max_ops == 200_000


def test_memory_stays_bounded_past_the_cap() -> None:
    """About 4 KB of Python objects per recorded op: 40k uncapped ops would take ~170 MB."""
    tracemalloc.start()
    try:
        report = dtypelint.audit(Loop(40_000), torch.ones(2), options=Options(max_ops=1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.graph.graph["ops_run"] == 40_000
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MB"


def test_tracer_records_at_most_max_ops() -> None:
    model, x = Loop(300), torch.ones(2)
    with dtypelint.Tracer(model, max_ops=10) as tracer:
        model(x)
    assert len(tracer.records) == 10 and tracer.ops_run == 300


def test_cli_max_ops(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "loop_entry.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Loop(nn.Module):\n"
        "    def forward(self, x):\n"
        "        for _ in range(500):\n"
        "            x = x + 1\n"
        "        return x\n\n"
        "def build():\n    return Loop(), torch.ones(2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    main(["check", "--entry", "loop_entry:build", "--max-ops", "100", "--format", "json", "--exit-zero"])
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert [f["code"] for f in findings] == ["DT002"] and "500 ops" in findings[0]["message"]


META_GROWTH = """
import resource, sys
import dtypelint
from dtypelint.load import load_config

config = load_config(sys.argv[1])
config.max_position_embeddings = 200_000  # seq_len 100k is then valid for the model itself
small = dtypelint.audit_config(config)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
big = dtypelint.audit_config(config, batch=1000, seq_len=100_000)
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
key = lambda report: [(f.code, f.location, f.tensor, f.op) for f in report.findings]
ops = lambda report: [report.graph.nodes[op]["target"] for op in report.graph.ops()]
print(growth, key(small) == key(big), ops(small) == ops(big), big.graph.graph["error"])
"""


def test_meta_mode_inputs_are_fake_so_memory_does_not_grow_with_batch_times_seq(tiny_llama_path) -> None:
    """batch x seq_len = 10^8: real int64 input_ids and mask alone would take 1.6 GB."""
    run = subprocess.run(
        [sys.executable, "-c", META_GROWTH, str(tiny_llama_path)],
        capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    growth, same_findings, same_ops, error = run.stdout.split()
    assert float(growth) < 100, f"peak RSS grew {growth} MB"
    assert same_findings == "True" and same_ops == "True" and error == "None"
