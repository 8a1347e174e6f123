"""The output formats of ``dtypelint.formats`` on real reports. SARIF is validated against the official
schema (``helpers.sarif_validator``)."""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import replace
from importlib import metadata
from urllib.parse import urlsplit

import jsonschema
import pytest
import torch
from helpers import markdown_view, parse_github_command, sarif_validator
from torch import nn

from dtypelint import audit
from dtypelint.diagnostics import FINDING_COLUMNS, Finding, Fix
from dtypelint.drawing import MAX_PATH_NODES, error_drawings
from dtypelint.errors import UsageError
from dtypelint.fixes import fix
from dtypelint.formats import FORMATS, render
from dtypelint.formats.base import grouped
from dtypelint.formats.github import escape_data, escape_property
from dtypelint.formats.sarif import SARIF_SCHEMA_URI, artifact_uri
from dtypelint.plan import FixResult
from dtypelint.report import Report
from dtypelint.rules import all_rules

CHECKPOINT = "checkpoints/tiny-llama"
LEVELS = {"error": "error", "warning": "warning", "info": "note"}


@pytest.fixture(scope="module", name="sarif_validator")
def _sarif_validator() -> jsonschema.Draft4Validator:
    return sarif_validator()


@pytest.fixture
def stray_report(stray_fp32_layer) -> Report:
    report = audit(stray_fp32_layer, torch.randn(2, 16, dtype=torch.float16))
    codes = [(finding.code, finding.severity) for finding in report.findings]
    assert codes == [("DT001", "error"), ("DT101", "error"), ("DT105", "warning")]
    return report


@pytest.fixture
def clean_report(tiny_llama_fp16, input_ids) -> Report:
    report = audit(tiny_llama_fp16, {"input_ids": input_ids})
    assert report.findings == []
    return report


def awkward(report: Report) -> Report:
    """The report with one more finding whose text needs escaping everywhere, from a rule no pack has."""
    odd = Finding(
        code="ZZ999",
        category="promotion",
        severity="info",
        location="",
        tensor="a|b",
        op=None,
        dtypes=["float32"],
        message="100% <b>odd</b> | line one\r\nline two: a,b",
    )
    return replace(report, findings=[*report.findings, odd])


# registry, text, json -----------------------------------------------------------------------------------


def test_the_registry_names_every_format_and_rejects_others(stray_report):
    assert set(FORMATS) == {"text", "concise", "full", "json", "sarif", "github", "markdown", "html"}
    with pytest.raises(UsageError, match="unknown format"):
        render(stray_report, "xml")


def test_text_is_the_table_when_it_fits_and_one_line_per_finding_when_not(stray_report, clean_report, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    wide = render(stray_report, "text")
    assert wide.startswith(stray_report.table().splitlines()[0][:40]) and wide == render(stray_report, "full")
    monkeypatch.setenv("COLUMNS", "60")
    narrow = render(stray_report, "text")
    assert narrow == render(stray_report, "concise")
    lines = narrow.splitlines()
    # DT001 raised at the op DT101 names: one cause, one line, which ends with the exception.
    assert lines[0] == ("head: error DT101 aten.addmm needs one dtype but receives parameter head.bias float32, "
                        "activation from aten.addmm float16, parameter head.weight float32; the forward raised "
                        "here (DT001): RuntimeError: mat1 and mat2 must have the same dtype, but got Half and Float "
                        "[cast 2 tensors to float16 (safe)]")
    assert not [line for line in lines if "DT001 forward raised" in line]
    for finding in stray_report.findings:  # names are never cut, whatever the width
        assert finding.tensor is None or finding.tensor in narrow
    assert "1 error, 1 warning fixable with `--fix`" in lines
    assert "`dtypelint explain DT101` explains a rule and how to fix it by hand" in lines
    assert lines[-1] == stray_report.summary_line()
    assert render(clean_report) == clean_report.summary_line()  # clean: nothing to do


@pytest.mark.parametrize("which", ["stray_report", "clean_report"])
def test_json_round_trips_to_the_same_findings(which, request):
    report = request.getfixturevalue(which)
    data = json.loads(render(report, "json"))
    assert list(data) == ["model", "backend", "mode", "compute_dtype", "steps", "summary", "graph", "notes", "findings",
                          "groups"]
    assert data["summary"] == report.counts()
    graph = report.graph
    assert data["graph"] == {"ops": sum(1 for _ in graph.ops()), "tensors": sum(1 for _ in graph.tensors())}

    def finding(item: dict) -> Finding:
        fix = item["fix"] and Fix(**{**item["fix"], "tensors": tuple(item["fix"]["tensors"])})
        return Finding(**{**item, "fix": fix})

    findings = [finding(item) for item in data["findings"]]
    assert findings == [replace(finding, node=None) for finding in report.findings]


# SARIF ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["stray_report", "clean_report"])
@pytest.mark.parametrize("path", [CHECKPOINT, None, "/abs/dir with space/config.json"])
def test_sarif_is_valid_against_the_official_schema(which, path, request, sarif_validator):
    log = json.loads(render(request.getfixturevalue(which), "sarif", path=path))
    errors = sorted(sarif_validator.iter_errors(log), key=lambda error: list(error.path))
    assert not errors, "\n".join(f"{list(error.path)}: {error.message}" for error in errors)
    assert log["version"] == "2.1.0" and log["$schema"] == SARIF_SCHEMA_URI


def test_sarif_results_match_the_findings(stray_report):
    log = json.loads(render(stray_report, "sarif", path=CHECKPOINT))
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "dtypelint"
    assert driver["version"] == metadata.version("dtypelint")
    ids = [rule["id"] for rule in driver["rules"]]
    assert len(ids) == len(set(ids)) and set(ids) == {rule.code for rule in all_rules()}
    for descriptor in driver["rules"]:
        rule = next(rule for rule in all_rules() if rule.code == descriptor["id"])
        assert descriptor["name"] == rule.name
        assert descriptor["shortDescription"]["text"] == rule.summary
        assert descriptor["help"]["markdown"] == rule.docs.strip()
        assert descriptor["defaultConfiguration"]["level"] == LEVELS[rule.severity]

    results = run["results"]
    assert len(results) == len(stray_report.findings)
    for result, finding in zip(results, stray_report.findings, strict=True):
        assert result["ruleId"] == finding.code
        assert driver["rules"][result["ruleIndex"]]["id"] == finding.code
        assert result["level"] == LEVELS[finding.severity]
        assert result["message"]["text"] == finding.message
        (location,) = result["locations"]
        assert location["physicalLocation"]["artifactLocation"]["uri"] == CHECKPOINT
        logical = location["logicalLocations"]
        assert logical[0] == {"name": "head", "fullyQualifiedName": "head", "kind": "module"}
        if finding.tensor:
            assert logical[1] == {"name": "weight", "fullyQualifiedName": "head.weight", "kind": "member"}
        properties = result["properties"]
        assert (properties["category"], properties["tensor"], properties["op"], properties["dtypes"]) == (
            finding.category, finding.tensor, finding.op, finding.dtypes,
        )
        assert "fixes" not in result  # SARIF fixes need text replacements; a cast is not one
        if finding.fix:
            assert properties["fix"] == {
                "description": finding.fix.description,
                "tensors": list(finding.fix.tensors),
                "toDtype": finding.fix.to_dtype,
                "safety": finding.fix.safety,
            }
        else:
            assert "fix" not in properties
    assert [r["properties"]["fix"]["safety"] for r in results if "fix" in r["properties"]] == ["safe", "safe"]  # one cast, one safety
    fingerprints = [r["partialFingerprints"]["dtypelintFinding/v1"] for r in results]
    assert len(set(fingerprints)) == len(fingerprints)
    assert run["properties"]["summary"] == {"error": 2, "warning": 1, "info": 0}


def test_sarif_of_a_clean_report_has_no_results_and_every_rule(clean_report):
    (run,) = json.loads(render(clean_report, "sarif", path=CHECKPOINT))["runs"]
    assert run["results"] == []
    assert len(run["tool"]["driver"]["rules"]) == len(all_rules())


def test_sarif_describes_codes_from_packs_it_was_not_given(stray_report, sarif_validator):
    log = json.loads(render(awkward(stray_report), "sarif", path=CHECKPOINT))
    sarif_validator.validate(log)
    (run,) = log["runs"]
    result = run["results"][-1]
    assert run["tool"]["driver"]["rules"][result["ruleIndex"]]["id"] == "ZZ999"
    assert result["level"] == "note"
    assert result["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] == "<model>"


def test_artifact_uris_are_uri_references():
    assert artifact_uri("checkpoints/tiny-llama") == "checkpoints/tiny-llama"
    assert artifact_uri("my model/config.json") == "my%20model/config.json"
    assert artifact_uri("/abs/dir with space") == "file:///abs/dir%20with%20space"
    assert artifact_uri(os.fsdecode(b"ck\xffpt/config.json")) == "ck%FFpt/config.json"  # the byte, not U+FFFD
    assert artifact_uri(os.fsdecode(b"/abs/ck\xffpt")) == "file:///abs/ck%FFpt"
    for uri in ("my%20model/config.json", "file:///abs/dir%20with%20space"):
        assert " " not in uri and urlsplit(uri).path


# GitHub workflow commands ---------------------------------------------------------------------------


def test_github_has_one_parsable_line_per_finding(stray_report):
    lines = render(stray_report, "github", path=CHECKPOINT).splitlines()
    listed = grouped(stray_report).findings  # DT001 joins the DT101 line: one annotation per cause
    assert len(lines) == len(listed) == len(stray_report.findings) - 1
    parsed = [parse_github_command(line) for line in lines]
    assert [command for command, _, _ in parsed] == ["error", "warning"]
    for (_, properties, message), finding in zip(parsed, listed, strict=True):
        assert properties["file"] == CHECKPOINT
        assert properties["title"] == f"{finding.code} {finding.category}"  # the generic rules' names
        assert message == f"head: {finding.message}"


def test_github_escapes_data_and_properties(stray_report):
    path = "ckpt/50%,v2:final"
    lines = render(awkward(stray_report), "github", path=path).splitlines()
    assert len(lines) == 3  # the CR LF inside the message did not break the line (DT001 joins DT101's)
    command, properties, message = parse_github_command(lines[-1])
    assert command == "notice"
    assert properties == {"file": path, "title": "ZZ999 promotion"}
    assert message == "<model>: 100% <b>odd</b> | line one\\r\\nline two: a,b"  # people read it: shown escaped
    assert "file=ckpt/50%25%2Cv2%3Afinal," in lines[-1]
    assert escape_data("a%\r\n:,") == "a%25%0D%0A:,"
    assert escape_property("a%\r\n:,") == "a%25%0D%0A%3A%2C"


def test_github_without_path_or_findings(stray_report, clean_report):
    assert render(clean_report, "github", path=CHECKPOINT) == ""
    _, properties, _ = parse_github_command(render(stray_report, "github").splitlines()[0])
    assert list(properties) == ["title"]


# Markdown --------------------------------------------------------------------------------------------


def mermaid_blocks(text: str) -> list[str]:
    return re.findall(r"^```mermaid\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_markdown_has_the_summary_the_table_and_a_drawing_of_the_error(stray_report):
    text = render(stray_report, "markdown", path=CHECKPOINT)
    header, separator, *_ = table_rows(text)
    assert header == "| severity | code | pack | location | tensor | dtypes | message | fix |"
    assert separator == "|" + " --- |" * 8
    view = markdown_view(text)  # what the comment shows
    assert view.headings == [f"dtypelint: {stray_report.summary_line()}", "DT101 at head: aten.addmm @ head"]
    header, *rows = view.rows
    assert header == list(FINDING_COLUMNS)
    assert [row[1] for row in rows] == ["DT101", "DT105"]  # DT001, raised at the op DT101 names, joins its row
    assert rows[0][7] == "cast head.weight, head.bias to float16 (safe)" and "here (DT001): RuntimeError" in rows[0][6]
    names = ["head", "head.weight"]
    assert view.code == ["DT101", *names, "DT105", *names, "head"]  # the drawing's heading: head
    (block,) = mermaid_blocks(text)  # one cause, one drawing
    assert block.startswith("flowchart TD\n")
    assert "head.weight float32" in block and "head.bias float32" in block
    (node,) = {finding.node for finding in stray_report.errors}
    assert f"style {node} stroke" in block


def test_markdown_of_a_clean_report(clean_report):
    text = render(clean_report, "markdown")
    assert "No findings." in text and not table_rows(text) and not mermaid_blocks(text)


def test_markdown_cells_stay_cells(stray_report):
    text = render(awkward(stray_report), "markdown")
    view = markdown_view(text)
    *_, row = view.rows
    assert row == ["info", "ZZ999", "", "<model>", "a|b", "float32",
                   "100% <b>odd</b> | line one\\r\\nline two: a,b", "no automatic fix"]  # the CR LF shown escaped
    assert not view.kinds & {"html_inline", "html_block"} and "\r" not in text


@pytest.mark.parametrize("name", [" a ", "a ", " a", "   ", "`", "``a`", "a```b", "|", "\\|", "a\\"])
def test_markdown_code_spans_hold_any_name(stray_report, name):
    """CommonMark strips one space each side of a code span and ends it at a run of its fence's length."""
    odd = replace(stray_report.findings[0], location=name, tensor=f"{name}.weight")
    view = markdown_view(render(replace(stray_report, findings=[odd]), "markdown"))
    assert view.rows[-1][3:5] == [name, f"{name}.weight"]
    assert view.code[-1] == name  # the drawing's heading, outside the table


class SumOfManyWeights(nn.Module):
    """A float16 input times a float32 vector summed from 60 parameters: the drawing of the matmul's odd
    operand back to its roots is longer than a drawing may be."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ParameterList([nn.Parameter(torch.ones(4)) for _ in range(60)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.parts[0]
        for part in self.parts[1:]:
            total = total + part
        return x @ total.view(4, 1)


def test_a_drawing_longer_than_the_cap_is_trimmed_and_says_so_in_every_format():
    report = audit(SumOfManyWeights(), torch.randn(2, 4, dtype=torch.float16), dtype="float16")
    (drawing,) = error_drawings(report).drawn
    assert drawing.path.trimmed and len(drawing.path.nodes) == MAX_PATH_NODES
    assert f"(trimmed to {MAX_PATH_NODES} nodes)" in render(report, "markdown").replace("\\", "")
    assert f"(trimmed to {MAX_PATH_NODES} nodes)" in render(report, "html")


def test_markdown_and_html_draw_the_same_selection(stray_report, tiny_llama_fp16, input_ids):
    """One drawing selection (``drawing.error_drawings``): the comment and the page draw the same paths."""
    page_blocks = [html.unescape(block) for block in
                   re.findall(r'<pre class="mermaid">\n(.*?)</pre>', render(stray_report, "html"), re.DOTALL)]
    assert page_blocks and [block.rstrip("\n") for block in page_blocks] == [
        block.rstrip("\n") for block in mermaid_blocks(render(stray_report, "markdown"))]


# after --fix: every format shows the same before and after ------------------------------------------------


@pytest.fixture
def fixed(stray_fp32_layer) -> tuple[Report, FixResult]:
    """A float16 model with a float32 head (its error found), fixed: the head cast, the re-audit clean."""
    before = audit(stray_fp32_layer, torch.randn(2, 16, dtype=torch.float16))
    result = fix(stray_fp32_layer, before)
    assert result.changed and result.after is not None and result.after.errors == [] and before.errors
    return result.after, result


@pytest.mark.parametrize("format", sorted(FORMATS))
def test_every_format_shows_the_audit_before_the_fix_and_what_the_fix_did(format, fixed, sarif_validator):
    after, result = fixed
    before = result.before
    output = render(after, format, path=CHECKPOINT, fix=result)
    cast = [change.tensor for change in result.changed]
    if format == "json":
        data = json.loads(output)
        assert data["summary"] == before.counts() and len(data["findings"]) == len(before.findings)
        assert data["fix"]["outcome"] == result.summary_line() and data["fix"]["applied"] is True
        assert [change["tensor"] for change in data["fix"]["changes"]] == cast
        assert data["fix"]["after"]["summary"] == after.counts()
    elif format == "sarif":
        log = json.loads(output)
        sarif_validator.validate(log)
        (run,) = log["runs"]
        assert len(run["results"]) == len(before.findings) and run["properties"]["summary"] == before.counts()
        assert run["properties"]["fix"]["outcome"] == result.summary_line()
    else:
        shown = html.unescape(output).replace("\\", "")  # markdown escapes punctuation, html markup
        if format == "github":
            *annotations, outcome = output.splitlines()
            assert len(annotations) == len(grouped(before).findings)
            assert parse_github_command(outcome)[0] == "notice"
            assert "re-audit" in parse_github_command(outcome)[2]
        else:
            assert before.summary_line() in shown and result.summary_line() in shown
            assert all(name in shown for name in cast)
        assert after.summary_line() in shown  # the re-audit, inside the outcome


@pytest.mark.parametrize(("mode", "why"), [("meta", "meta mode has no weights to patch"),
                                           ("static", "--static runs no forward to verify with")])
def test_a_mode_that_cannot_fix_hints_value_mode_not_a_flag_it_refuses(stray_report, monkeypatch, mode, why):
    monkeypatch.setenv("COLUMNS", "60")
    lines = render(replace(stray_report, mode=mode), "text").splitlines()
    assert not any("--fix" in line for line in lines)
    assert f"1 error, 1 warning fixable in value mode (`--mode value` on a checkpoint with its weights; {why})" in lines
