"""The rule engine: findings, selection and the report."""

from __future__ import annotations

import json

import pytest
import torch

import dtypelint
from dtypelint import UsageError


def test_stray_fp32_layer_is_a_mixed_input_error_naming_its_weight(stray_fp32_layer):
    report = dtypelint.audit(stray_fp32_layer, torch.randn(2, 16, dtype=torch.float16))
    mixed = [f for f in report.findings if f.category == "mixed-input"]
    assert len(mixed) == 1
    finding = mixed[0]
    assert (finding.code, finding.severity, finding.location, finding.tensor) == (
        "DT101", "error", "head", "head.weight"
    )
    assert finding.dtypes == ["float16", "float32"]
    assert "parameter head.weight float32" in finding.message
    assert finding.fix is not None and set(finding.fix.tensors) == {"head.weight", "head.bias"}
    assert finding.fix.to_dtype == "float16" and finding.fix.safety == "safe"
    assert [f.code for f in report.findings if f.category == "forward-error"] == ["DT001"]


def test_report_serialises_with_the_documented_keys(stray_fp32_layer):
    report = dtypelint.audit(stray_fp32_layer, torch.randn(2, 16, dtype=torch.float16))
    data = json.loads(json.dumps(report.to_dict()))
    keys = {"code", "category", "severity", "location", "tensor", "op", "dtypes", "message", "fix", "pack"}
    assert data["findings"] and all(set(f) == keys for f in data["findings"])
    assert data["summary"] == {"error": 2, "warning": 1, "info": 0}  # DT001, DT101; DT105
    assert all(f["category"] in dtypelint.CATEGORIES for f in data["findings"])
    text = report.render()
    assert "DT101" in text and "head.weight" in text and "2 errors" in text


def test_select_ignore_and_severity_overrides(stray_fp32_layer):
    x = torch.randn(2, 16, dtype=torch.float16)
    only_mixed = dtypelint.audit(stray_fp32_layer, x, select=["DT1"])
    assert [f.code for f in only_mixed.findings] == ["DT101", "DT105"]
    by_name = dtypelint.audit(stray_fp32_layer, x, ignore=["mixed-input"])
    assert [f.code for f in by_name.findings] == ["DT001", "DT105"]
    softened = dtypelint.audit(stray_fp32_layer, x, select=["DT101"], severity={"DT101": "warning"})
    assert [f.severity for f in softened.findings] == ["warning"]
    located = dtypelint.audit(stray_fp32_layer, x, per_location_ignores={"hea*": ["DT101"]})
    assert [f.code for f in located.findings] == ["DT001", "DT105"]


def test_unknown_selector_or_severity_is_a_usage_error(stray_fp32_layer):
    x = torch.randn(2, 16, dtype=torch.float16)
    with pytest.raises(UsageError, match="matches no rule"):
        dtypelint.audit(stray_fp32_layer, x, select=["XYZ9"])
    with pytest.raises(UsageError, match="severity"):
        dtypelint.audit(stray_fp32_layer, x, severity={"DT101": "fatal"})
