"""``sarif``: SARIF 2.1.0 (OASIS), one run.

``tool.driver.rules`` lists every rule known (the generic rules and the contracts of every shipped pack,
plus ``rules`` when given); each result points at the audited ``path`` (``physicalLocation``) and at the
module and tensor (``logicalLocations``, kinds ``module`` and ``member``). A dtype cast is not a text edit
of the artifact, and a SARIF ``fix`` must carry ``artifactChanges`` with text replacements, so fixes
travel in ``result.properties.fix`` instead; after ``--fix``, what the fix did is the run's
``properties.fix`` (``formats.fix.fix_dict``) and the results are the audit it started from. SARIF is
UTF-8: only undecodable bytes are escaped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_from_bytes

from dtypelint.diagnostics import ROOT_LOCATION
from dtypelint.escape import map_text, unicode_text
from dtypelint.formats.base import FormatContext, audited
from dtypelint.formats.fix import fix_dict

if TYPE_CHECKING:
    from dtypelint.diagnostics import Finding
    from dtypelint.report import Report
    from dtypelint.rules.base import Rule

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA_URI = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
SARIF_LEVELS = {"error": "error", "warning": "warning", "info": "note"}


def sarif_log(report: Report, context: FormatContext) -> dict[str, Any]:
    """The SARIF 2.1.0 log as a dict (``render_sarif`` serializes it)."""
    shown = audited(report, context)
    rules = context.rule_list()
    descriptors = [_rule_descriptor(rule) for rule in rules]
    index = {rule.code: number for number, rule in enumerate(rules)}
    for finding in shown.findings:  # codes from packs outside ``rules``: a minimal descriptor
        if finding.code not in index:
            index[finding.code] = len(descriptors)
            descriptors.append(_unknown_descriptor(finding))

    driver: dict[str, Any] = {"name": "dtypelint"}
    version = _version()
    if version:
        driver["version"] = version
        driver["semanticVersion"] = version
    information_uri = _information_uri()
    if information_uri:
        driver["informationUri"] = information_uri
    driver["rules"] = descriptors

    run: dict[str, Any] = {
        "tool": {"driver": driver},
        "results": [_sarif_result(shown, finding, index[finding.code], context.path) for finding in shown.findings],
        "properties": {
            "model": shown.model,
            "backend": shown.backend,
            "mode": shown.mode,
            "computeDtype": shown.compute_dtype,
            "summary": shown.counts(),
            "notes": list(shown.notes),
        },
    }
    if context.fix is not None:
        run["properties"]["fix"] = fix_dict(context.fix)
    if context.path is not None:
        run["artifacts"] = [{"location": {"uri": artifact_uri(context.path)}}]
    # SARIF is UTF-8: a name or message holding undecodable bytes shows them escaped (the artifact URI
    # percent-encodes the path's own bytes).
    return map_text({"version": SARIF_VERSION, "$schema": SARIF_SCHEMA_URI, "runs": [run]}, unicode_text)


def render_sarif(report: Report, context: FormatContext) -> str:
    return json.dumps(sarif_log(report, context), indent=2)


def artifact_uri(path: str | Path) -> str:
    """A URI reference for ``path``: relative paths stay relative (what code scanning matches against
    the repository), absolute ones become ``file://`` URIs. Both percent-encode the path's bytes, so a
    directory name that is not UTF-8 keeps its bytes."""
    path = Path(path)
    if path.is_absolute():
        return path.as_uri()
    return quote_from_bytes(os.fsencode(PurePosixPath(*path.parts).as_posix() if path.parts else "."), safe="/")


def _rule_descriptor(rule: Rule) -> dict[str, Any]:
    docs = rule.docs.strip()
    why = " ".join(rule.section("Why is this bad?").split())
    descriptor: dict[str, Any] = {
        "id": rule.code,
        "name": rule.name,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": f"{rule.summary} {why}".strip() if why else rule.summary},
        "defaultConfiguration": {"level": SARIF_LEVELS[rule.severity]},
        "properties": {"category": rule.category, "tags": [rule.category], "fix": rule.fix_availability},
    }
    if docs:
        descriptor["help"] = {"text": docs, "markdown": docs}
    return descriptor


def _unknown_descriptor(finding: Finding) -> dict[str, Any]:
    from dtypelint.rules import CATEGORIES

    summary = CATEGORIES.get(finding.category, finding.category)
    return {
        "id": finding.code,
        "shortDescription": {"text": summary},
        "properties": {"category": finding.category, "tags": [finding.category]},
    }


def _sarif_result(report: Report, finding: Finding, rule_index: int, path: str | Path | None) -> dict[str, Any]:
    logical = [
        {
            "name": finding.location.rsplit(".", 1)[-1] if finding.location else report.model,
            "fullyQualifiedName": finding.location or ROOT_LOCATION,
            "kind": "module",
        }
    ]
    if finding.tensor:
        logical.append(
            {"name": finding.tensor.rsplit(".", 1)[-1], "fullyQualifiedName": finding.tensor, "kind": "member"}
        )
    location: dict[str, Any] = {"logicalLocations": logical}
    if path is not None:
        location["physicalLocation"] = {"artifactLocation": {"uri": artifact_uri(path), "index": 0}}
    properties: dict[str, Any] = {
        "category": finding.category,
        "severity": finding.severity,
        "tensor": finding.tensor,
        "op": finding.op,
        "dtypes": list(finding.dtypes),
        "tags": [finding.category],
    }
    if finding.fix is not None:
        properties["fix"] = {
            "description": finding.fix.description,
            "tensors": list(finding.fix.tensors),
            "toDtype": finding.fix.to_dtype,
            "safety": finding.fix.safety,
        }
    return {
        "ruleId": finding.code,
        "ruleIndex": rule_index,
        "level": SARIF_LEVELS[finding.severity],
        "message": {"text": finding.message},
        "locations": [location],
        "partialFingerprints": {"dtypelintFinding/v1": _fingerprint(report, finding)},
        "properties": properties,
    }


def _fingerprint(report: Report, finding: Finding) -> str:
    """Stable across runs for the same problem: the model, rule, place, tensor, op and dtypes."""
    key = "\0".join(
        [report.model, finding.code, finding.location, finding.tensor or "", finding.op or "", *finding.dtypes]
    )
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]  # any name hashes


def _version() -> str | None:
    from importlib import metadata  # here, not at the top: the command line imports this module at start

    try:
        return metadata.version("dtypelint")
    except metadata.PackageNotFoundError:
        return None


def _information_uri() -> str | None:
    """The project's home page from the installed metadata (``[project.urls]``), if it declares one."""
    from importlib import metadata

    try:
        meta = metadata.metadata("dtypelint")
    except metadata.PackageNotFoundError:
        return None
    urls = {}
    for entry in meta.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        urls[label.strip().lower()] = url.strip()
    for label in ("homepage", "home", "documentation", "repository", "source"):
        if urls.get(label, "").startswith(("https://", "http://")):
            return urls[label]
    home = meta.get("Home-page") or ""
    return home if home.startswith(("https://", "http://")) else None
