"""Output formats: one renderer per format over the one violation model (``Report`` / ``Finding``).

``render(report, format, path=...)`` returns the text to print; ``FORMATS`` maps each format name to its
renderer, a function of ``(Report, FormatContext) -> str``. ``path`` is the audited checkpoint directory
or config file: SARIF and the GitHub annotations name it as the artifact the findings are about.

Module, parameter and buffer names, op names of the model's code and the exceptions it raised are any text.
The formats people read (all but ``json`` and ``sarif``) render a copy of the report in which each of them
is printable (``dtypelint.escape``: control characters, newlines, bidi overrides and undecodable bytes as
``repr`` escapes them), then escape it for their syntax. ``json`` keeps every text exact, ``sarif`` escapes
only undecodable bytes (SARIF is UTF-8).

Formats
-------
``text``
    The findings table when it fits the terminal (``COLUMNS``), else ``concise``; then what to do next
    (how many findings ``--fix`` / ``--fix --unsafe-fixes`` would fix, ``dtypelint explain``), the notes
    and the summary line.
``concise``
    One line per finding: ``location: severity CODE message [fix]``.
``full``
    Always the table; module and tensor names are never cut, long messages wrap.
``json``
    ``Report.to_dict()``, indented::

        {
          "model": "LlamaForCausalLM",           # class name of the audited model
          "backend": "hf-eager",                 # name of the rule pack in use
          "mode": "value" | "meta",
          "compute_dtype": "float16",
          "steps": 2,                            # calls traced: the prompt and decode steps (--steps)
          "model_source": "config.architectures",  # where the class name came from (or "--model-class",
                                                   # a task mapping); only for a checkpoint or config
          "inputs": [{"name": "input_ids", "shape": [1, 16], "dtype": "int64"}],  # what dtypelint made;
                                                   # only for a checkpoint or config
          "summary": {"error": 2, "warning": 1, "info": 0},
          "graph": {"ops": 123, "tensors": 456}, # size of the traced dtype graph
          "notes": ["..."],                      # what the audit could not do or assumed
          "findings": [
            {
              "code": "DT101",                   # rule code (`dtypelint explain DT101`)
              "category": "mixed-input",         # one of dtypelint.CATEGORIES
              "severity": "error" | "warning" | "info",
              "location": "model.layers.0.mlp",  # module path; "" for the model itself
              "tensor": "head.weight" | null,    # parameter / buffer / input at fault
              "op": "aten.addmm" | null,         # the op concerned
              "dtypes": ["float16", "float32"],
              "message": "...",
              "fix": null | {"tensors": ["head.weight"], "to_dtype": "float16",
                             "safety": "safe" | "unsafe", "description": "..."},
              "pack": "cuda" | null                # the backend pack of a kernel contract; null: generic
            }
          ]
        }

    The keys are stable; new keys may be added.
``sarif``
    SARIF 2.1.0 (OASIS), one run. ``tool.driver.rules`` lists every rule known (the generic rules and
    the contracts of every shipped pack, plus ``rules`` when given); each result points at the audited
    ``path`` (``physicalLocation``) and at the module and tensor (``logicalLocations``, kinds ``module``
    and ``member``). A dtype cast is not a text edit of the artifact, and a SARIF ``fix`` must carry
    ``artifactChanges`` with text replacements, so fixes travel in ``result.properties.fix`` instead.
``github``
    GitHub Actions workflow commands, one line per finding:
    ``::error file=PATH,title=CODE NAME::LOCATION: MESSAGE`` (``::warning`` / ``::notice`` for warnings
    and infos). Empty when there is no finding.
``markdown``
    For a pull-request comment: a heading with the summary line, a table of the findings, the notes, and
    a Mermaid drawing of the dtype graph around each op where an error was found. Names are code spans,
    other text has its ASCII punctuation backslash-escaped: nothing from the model renders as markup.
``html``
    One self-contained page (``dtypelint.html``): the summary, findings and notes, and for each error a
    Mermaid drawing of the path from its root cause to the op, dtypes on the edges. Opens offline.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_from_bytes

from dtypelint.diagnostics import CODE_COLUMNS, FINDING_COLUMNS, ROOT_LOCATION, Finding
from dtypelint.errors import UsageError
from dtypelint.escape import map_text, printable, unicode_text
from dtypelint.report import Report

if TYPE_CHECKING:
    from dtypelint.fixes import FixResult
    from dtypelint.graph import DtypeGraph
    from dtypelint.rules.base import Rule

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA_URI = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
SARIF_LEVELS = {"error": "error", "warning": "warning", "info": "note"}
GITHUB_COMMANDS = {"error": "error", "warning": "warning", "info": "notice"}

# Markdown drawings: at most this many nodes each (dtypelint.drawing.MAX_DRAWINGS drawings per comment).
MERMAID_MAX_NODES = 40


@dataclass(frozen=True)
class FormatContext:
    """What a renderer may need besides the report. ``rules``: the rules that could have reported
    (default: ``dtypelint.rules.all_rules()``, the generic rules and every shipped pack)."""

    path: str | Path | None = None
    rules: Sequence[Rule] | None = None
    fix: FixResult | None = None  # what --fix did, for the formats that show it

    def rule_list(self) -> list[Rule]:
        from dtypelint.rules import all_rules

        rules = list(self.rules) if self.rules is not None else all_rules()
        unique: dict[str, Rule] = {}
        for rule in rules:
            unique.setdefault(rule.code, rule)
        return list(unique.values())

    def rule_names(self) -> dict[str, str]:
        return {rule.code: rule.name for rule in self.rule_list()}


Renderer = Callable[[Report, FormatContext], str]


# text, json ---------------------------------------------------------------------------------------------


def render_text(report: Report, context: FormatContext) -> str:
    """The table when it fits the terminal (``COLUMNS``), else one line per finding: names are never cut."""
    table = _fitted_table(report, _terminal_width())
    return _text(report, context, table if table is not None else _concise_lines(report))


def render_full(report: Report, context: FormatContext) -> str:
    table = _fitted_table(report, _terminal_width())
    return _text(report, context, table if table is not None else report.table(message_width=MIN_MESSAGE_WIDTH))


def render_concise(report: Report, context: FormatContext) -> str:
    return _text(report, context, _concise_lines(report))


# The narrowest a wrapped message column may get before one line per finding reads better.
MIN_MESSAGE_WIDTH = 30


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size(fallback=(120, 24)).columns


def _fitted_table(report: Report, width: int) -> str | None:
    """The table with its message column wrapped to fit ``width``, or None when even a narrow message
    column leaves no room (long module and tensor names)."""
    if not report.findings:
        return ""
    narrow = report.table(message_width=MIN_MESSAGE_WIDTH)
    spare = width - max(map(len, narrow.splitlines()))
    if spare < 0:
        return None
    return report.table(message_width=MIN_MESSAGE_WIDTH + spare)


def _concise_lines(report: Report) -> str:
    """``location: severity CODE message [fix]``, one finding a line."""
    return "\n".join(
        f"{finding.location or ROOT_LOCATION}: {finding.severity} {finding.code} {finding.message} "
        f"[{finding.fix.short() if finding.fix else 'no automatic fix'}]"
        for finding in report.ordered()
    )


def _text(report: Report, context: FormatContext, findings: str) -> str:
    """The findings, then what to do next (ruff's closing lines), the notes and the summary line; after a
    fix, the fix's own table and outcome."""
    if context.fix is not None:
        before = context.fix.before or report
        return "\n".join(part for part in (findings, *_notes(before), before.summary_line(), context.fix.render()) if part)
    return "\n".join(part for part in (findings, *_notes(report), *_next_steps(report), report.summary_line()) if part)


def _notes(report: Report) -> list[str]:
    loaded = report.loaded_line()
    return [f"note: {note}" for note in report.notes] + ([loaded] if loaded else [])


def _next_steps(report: Report) -> list[str]:
    if not report.findings:
        return []
    safe = [finding for finding in report.findings if finding.fix and finding.fix.safety == "safe"]
    unsafe = [finding for finding in report.findings if finding.fix and finding.fix.safety == "unsafe"]
    steps = []
    if safe:
        steps.append(f"{_count(safe)} fixable with `--fix`")
    if unsafe:
        steps.append(f"{_count(unsafe)} fixable with `--fix --unsafe-fixes` (it may cost precision; "
                     f"`--diff` lists the casts first)")
    example = next((finding for finding in report.ordered() if finding.fix), report.ordered()[0])
    steps.append(f"`dtypelint explain {example.code}` explains a rule and how to fix it by hand")
    return steps


def _count(findings: list[Finding]) -> str:
    by_severity = Counter(finding.severity for finding in findings)
    return ", ".join(f"{count} {severity}{'s' if count != 1 else ''}" for severity, count in by_severity.items())


def render_json(report: Report, context: FormatContext) -> str:
    data = report.to_dict()
    if context.fix is not None:
        data["fix"] = context.fix.to_dict()
    return json.dumps(data, indent=2)


# SARIF ------------------------------------------------------------------------------------------------


def sarif_log(report: Report, context: FormatContext) -> dict[str, Any]:
    """The SARIF 2.1.0 log as a dict (``render_sarif`` serializes it)."""
    rules = context.rule_list()
    descriptors = [_rule_descriptor(rule) for rule in rules]
    index = {rule.code: number for number, rule in enumerate(rules)}
    for finding in report.findings:  # codes from packs outside ``rules``: a minimal descriptor
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
        "results": [_sarif_result(report, finding, index[finding.code], context.path) for finding in report.findings],
        "properties": {
            "model": report.model,
            "backend": report.backend,
            "mode": report.mode,
            "computeDtype": report.compute_dtype,
            "summary": report.counts(),
            "notes": list(report.notes),
        },
    }
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


# GitHub Actions workflow commands ---------------------------------------------------------------------


def escape_data(text: str) -> str:
    """Escape the message of a workflow command (``%``, ``\\r``, ``\\n``)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a property value of a workflow command: as data, and ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_line(finding: Finding, *, path: str | Path | None = None, rule_name: str | None = None) -> str:
    command = GITHUB_COMMANDS[finding.severity]
    properties = []
    if path is not None:
        properties.append(f"file={escape_property(str(path))}")
    title = f"{finding.code} {rule_name or finding.category}"
    properties.append(f"title={escape_property(title)}")
    message = f"{finding.location or ROOT_LOCATION}: {finding.message}"
    return f"::{command} {','.join(properties)}::{escape_data(message)}"


def render_github(report: Report, context: FormatContext) -> str:
    names = context.rule_names()
    return "\n".join(
        github_line(finding, path=context.path, rule_name=names.get(finding.code)) for finding in report.ordered()
    )


# Markdown --------------------------------------------------------------------------------------------


def render_markdown(report: Report, context: FormatContext) -> str:
    """Every text from the model is literal: names in code spans, the rest with its punctuation escaped."""
    lines = [f"### dtypelint: {_md_literal(report.summary_line())}", ""]
    if report.findings:
        lines += ["| " + " | ".join(FINDING_COLUMNS) + " |", "|" + " --- |" * len(FINDING_COLUMNS)]
        for finding in report.ordered():
            cells = [_md_code(cell, in_table=True) if column in CODE_COLUMNS and cell else _md_literal(cell)
                     for column, cell in zip(FINDING_COLUMNS, finding.cells(), strict=True)]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("No findings.")
    if report.notes or report.loaded_line():
        lines += ["", *(f"- {_md_literal(line)}" for line in _notes(report))]

    from dtypelint.drawing import MAX_DRAWINGS, error_sites  # torch's op vocabulary: not at the CLI's start

    drawings = error_sites(report)
    for number, (node, findings) in enumerate(drawings.items()):
        if number == MAX_DRAWINGS:
            lines += ["", f"_{len(drawings) - number} more error sites not drawn._"]
            break
        codes = ", ".join(dict.fromkeys(finding.code for finding in findings))
        where = findings[0].location or ROOT_LOCATION
        tensors = [finding.tensor for finding in findings if finding.tensor]
        nodes, trimmed = error_drawing_nodes(report.graph, node, tensors)
        note = " (trimmed)" if trimmed else ""
        lines += [
            "",
            f"#### {_md_literal(codes)} at {_md_code(where, in_table=False)}: "
            f"{_md_literal(report.graph.label(node))}{note}",
            "",
            "```mermaid",
            report.graph.to_mermaid(nodes).rstrip("\n"),
            "```",
        ]
    return "\n".join(lines)


def error_drawing_nodes(
    graph: DtypeGraph, node: str, tensors: Iterable[str] = (), *, max_nodes: int = MERMAID_MAX_NODES
) -> tuple[set[str], bool]:
    """The nodes to draw around an error at ``node``: its neighbourhood of radius 2 (1 when that exceeds
    ``max_nodes``), plus the path from each named tensor (``head.weight``) to the node, so the drawing
    shows the tensor at fault. Returns the nodes and whether the drawing had to be trimmed further."""
    import networkx as nx  # only for drawings: the command line imports this module for its --format choices

    paths: set[str] = set()
    for name in tensors:
        leaf = graph.find_tensor(name)
        if leaf is not None and nx.has_path(graph, leaf, node):
            paths.update(nx.shortest_path(graph, leaf, node))
    for radius in (2, 1):
        nodes = set(graph.neighbourhood(node, radius)) | paths
        if len(nodes) <= max_nodes:
            return nodes, False
    # Too wide even at radius 1 (an op with many inputs): keep the node, the paths, and as many of its
    # direct neighbours as fit.
    nodes = {node} | paths
    neighbours = sorted(set(graph.predecessors(node)) | set(graph.successors(node)), key=_node_key)
    for neighbour in neighbours:
        if len(nodes) >= max_nodes:
            break
        nodes.add(neighbour)
    return nodes, True


def _node_key(node: str) -> tuple[str, int, str]:
    head = node.rstrip("0123456789")
    tail = node[len(head) :]
    return (head, int(tail) if tail else -1, node)


# CommonMark lets a backslash escape any ASCII punctuation character (and only those).
_MD_PUNCTUATION = re.compile(r"[!-/:-@\[-`{-~]")


def _md_literal(text: str) -> str:
    """Printable text (``escape.printable``) as literal Markdown, in a table cell too: every ASCII
    punctuation character backslash-escaped, so no emphasis, link, image, HTML, code span or column break
    starts (GFM takes ``\\|`` for a pipe inside a cell)."""
    return _MD_PUNCTUATION.sub(r"\\\g<0>", text)


def _md_code(text: str, *, in_table: bool) -> str:
    """Printable, non-empty text as a CommonMark code span, literal whatever it holds: the fence is one
    backtick longer than the longest run of backticks in it, and a space pads each side where the text
    starts or ends with a backtick, or starts and ends with a space (CommonMark strips one space each
    side then). GFM splits a table row before it reads code spans: there ``|`` is escaped, and GFM drops
    the backslash."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.strip(" ") and (text[0] == "`" or text[-1] == "`" or text[0] == text[-1] == " ") else ""
    if in_table:
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_cell(text: str) -> str:
    """dtypelint's own Markdown (a rule's summary) in a table cell: no HTML, no column breaks, one line."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return " ".join(text.replace("|", "\\|").split())


# Registry --------------------------------------------------------------------------------------------


# The rule catalog (`dtypelint rules`, the README's table) ---------------------------------------------

RULE_COLUMNS = ("code", "name", "pack", "severity", "fix", "enabled", "what it does")


def rule_rows(rules: Iterable[Rule], enabled: Callable[[Rule], bool] = lambda rule: True) -> list[tuple[str, ...]]:
    """One row per rule: identity, where it comes from, whether it can fix and whether it runs."""
    return [
        (rule.code, rule.name, rule.pack or "generic", rule.severity, rule.fix_availability,
         "yes" if enabled(rule) else "no", rule.summary)
        for rule in rules
    ]


def render_rules(rules: Iterable[Rule], format: str = "text", enabled: Callable[[Rule], bool] = lambda rule: True) -> str:
    """The rule catalog as a terminal table (``text``) or a Markdown table (``markdown``)."""
    from tabulate import tabulate

    rows = rule_rows(rules, enabled)
    if format == "markdown":  # unpadded, so that a diff of the README shows only what changed
        lines = [RULE_COLUMNS, ("---",) * len(RULE_COLUMNS), *rows]
        return "\n".join("| " + " | ".join(_md_cell(cell) for cell in line) + " |" for line in lines)
    return tabulate(rows, headers=RULE_COLUMNS, maxcolwidths=[None] * 6 + [60])


def _html(report: Report, context: FormatContext) -> str:
    from dtypelint.html import render_html  # draws with the graph: imported when a page is asked for

    return render_html(report, context)


def _for_people(renderer: Renderer) -> Renderer:
    """A format people read: it renders a copy of the report, path and fix in which every text from the
    model is printable (``dtypelint.escape.printable``), so that no name or message moves the terminal's
    cursor, sets its title, reorders a line or breaks a table row. Data formats (json, sarif) keep the
    texts, which their own escaping carries exactly."""

    @functools.wraps(renderer)
    def render_printable(report: Report, context: FormatContext) -> str:
        return renderer(map_text(report, printable), map_text(context, printable))

    return render_printable


FORMATS: dict[str, Renderer] = {
    "text": _for_people(render_text),
    "concise": _for_people(render_concise),
    "full": _for_people(render_full),
    "json": render_json,
    "sarif": render_sarif,
    "github": _for_people(render_github),
    "markdown": _for_people(render_markdown),
    "html": _for_people(_html),
}


def render(
    report: Report, format: str = "text", *, path: str | Path | None = None, rules: Sequence[Rule] | None = None,
    fix: FixResult | None = None,
) -> str:
    """The report in ``format`` (a key of ``FORMATS``). ``path``: the audited checkpoint or config, named
    as the artifact by ``sarif`` and ``github``. ``rules``: the rules listed by ``sarif`` and named by
    ``github`` (default: the generic rules and every shipped pack's contracts)."""
    try:
        renderer = FORMATS[format]
    except KeyError:
        raise UsageError(f"unknown format {format!r}; one of {', '.join(FORMATS)}") from None
    return renderer(report, FormatContext(path=path, rules=rules, fix=fix))
