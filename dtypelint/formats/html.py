"""``html``: the report as one self-contained page that opens without a network.

The page holds the summary line, the findings table, the notes, for each error (up to
``drawing.MAX_DRAWINGS``) a Mermaid drawing of the path from its root cause to the failing op, with the
dtype on every edge and the op and the odd-dtype operand highlighted (``dtypelint.drawing``, the drawings
of the Markdown format), and after ``--fix`` the fix. Mermaid (vendored in
``dtypelint/vendor``, see its README) is inlined; a Content-Security-Policy forbids every fetch, so a
page that renders here renders anywhere.

Every text that comes from the model is printable (``formats`` renders a copy of the report made so) and
HTML-escaped; Mermaid source is escaped for Mermaid first (``drawing.mermaid_text``) and then for HTML, since
Mermaid reads it back from the page's text.
"""

from __future__ import annotations

import re
from functools import cache
from html import escape
from importlib.resources import files
from typing import TYPE_CHECKING

from dtypelint.diagnostics import CODE_COLUMNS, FINDING_COLUMNS, ROOT_LOCATION
from dtypelint.drawing import ContractDrawing, ErrorDrawing, error_drawings
from dtypelint.formats.base import FormatContext, audited, grouped
from dtypelint.formats.fix import FIX_COLUMNS, fix_notes, fix_outcome, fix_rows

if TYPE_CHECKING:
    from dtypelint.diagnostics import Finding
    from dtypelint.plan import FixResult
    from dtypelint.report import Report

# Inline script and style only; nothing may be fetched, not even an image or a font.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; font-src data:"
)

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.4em; margin-bottom: .2em; }
.summary { font-weight: 600; }
table { border-collapse: collapse; width: 100%; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: .3em .5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td code, h2 code { overflow-wrap: normal; word-break: normal; }
td:nth-child(-n+2) { white-space: nowrap; }
tr.error td:first-child { color: #b71c1c; font-weight: 600; }
tr.warning td:first-child { color: #8a5a00; font-weight: 600; }
.notes li { color: #444; }
section.error-site { border-top: 1px solid #ddd; margin-top: 1.5em; }
h2 { font-size: 1.1em; }
.legend span { display: inline-block; padding: 0 .4em; margin-right: .6em; border: 2px solid; }
.legend .conflict { background: #fde2e1; border-color: #c62828; }
.legend .culprit { background: #fff3cd; border-color: #e65100; }
pre.mermaid { background: #fff; overflow-x: auto; }
"""

# Runs after the inlined Mermaid. ``data-drawings`` on <body> says how rendering ended: tests read it
# from the dumped DOM, and a reader whose drawings failed sees why.
START_SCRIPT = """
mermaid.initialize({startOnLoad: false, securityLevel: "strict", theme: "default",
                    flowchart: {htmlLabels: false, useMaxWidth: true}});
mermaid.run({querySelector: "pre.mermaid"})
  .then(() => { document.body.dataset.drawings = "rendered"; })
  .catch((error) => { document.body.dataset.drawings = "failed: " + error; });
"""


def render_html(report: Report, context: FormatContext) -> str:
    shown = audited(report, context)
    parts = [
        f"<h1>dtypelint</h1>\n<p class=\"summary\">{escape(shown.summary_line())}</p>",
        f"<p class=\"loaded\">{escape(shown.loaded_line())}</p>" if shown.loaded_line() else "",
        findings_table(grouped(shown).ordered()),
        notes_list(shown.notes),
        *drawing_sections(grouped(shown)),
        fix_section(context.fix) if context.fix is not None else "",
    ]
    return page(f"dtypelint: {shown.summary_line()}", "\n".join(part for part in parts if part))


def page(title: str, body: str) -> str:
    """The whole page; Mermaid (5.5 MB) is inlined only where the body has something to draw."""
    drawn = '<pre class="mermaid">' in body
    scripts = f"<script>{inline_script(mermaid_js())}</script>\n<script>{START_SCRIPT}</script>\n" if drawn else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{STYLE}</style>
</head>
<body>
{body}
{scripts}</body>
</html>
"""


def findings_table(findings: list[Finding]) -> str:
    if not findings:
        return "<p>No findings.</p>"
    rows = [f"<tr class=\"{escape(finding.severity)}\">{findings_cells(finding)}</tr>" for finding in findings]
    return table("findings", FINDING_COLUMNS, rows)


def table(kind: str, columns: tuple[str, ...], rows: list[str]) -> str:
    """A table of class ``kind``: its header, and rows already made (``<tr>`` of escaped cells)."""
    header = "".join(f"<th>{column}</th>" for column in columns)
    return "\n".join([f"<table class=\"{kind}\">", f"<thead><tr>{header}</tr></thead>", "<tbody>", *rows, "</tbody>",
                      "</table>"])


def findings_cells(finding: Finding) -> str:
    cells = [code(cell) if column in CODE_COLUMNS and cell else escape(cell)
             for column, cell in zip(FINDING_COLUMNS, finding.cells(), strict=True)]
    return "".join(f"<td>{cell}</td>" for cell in cells)


def notes_list(notes: list[str]) -> str:
    if not notes:
        return ""
    return "<ul class=\"notes\">\n" + "\n".join(f"<li>note: {escape(note)}</li>" for note in notes) + "\n</ul>"


def drawing_sections(report: Report) -> list[str]:
    """One section per error site drawn, a line saying how many more there are, and the errors with
    nothing to draw."""
    drawings = error_drawings(report)
    sections = [error_section(number, drawing) for number, drawing in enumerate(drawings.drawn, start=1)]
    sections += [contract_section(number, drawing)
                 for number, drawing in enumerate(drawings.contracts, start=len(drawings.drawn) + 1)]
    if drawings.more:
        sections.append(f"<p class=\"more\">{drawings.more} more error sites not drawn.</p>")
    if drawings.unplaced:
        sections.append(unplaced_section(drawings.unplaced))
    return sections


def unplaced_section(findings: list[Finding]) -> str:
    items = [
        f"<li>{escape(finding.code)} at {code(finding.location or ROOT_LOCATION)}"
        + (f": {code(finding.tensor)}" if finding.tensor else "") + "</li>"
        for finding in findings
    ]
    return "\n".join([
        "<section class=\"unplaced\">",
        "<p>Not drawn: these errors name nothing the traced forward used (for example a buffer read only while "
        "the model was built).</p>",
        "<ul>", *items, "</ul>",
        "</section>",
    ])


def error_section(number: int, drawing: ErrorDrawing) -> str:
    return "\n".join([
        f"<section class=\"error-site\" id=\"error-{number}\">",
        f"<h2>{escape(drawing.codes)} at {code(drawing.location)}: {escape(drawing.site)}</h2>",
        legend(drawing),
        f"<pre class=\"mermaid\">\n{escape(drawing.mermaid)}</pre>",
        "</section>",
    ])


def contract_section(number: int, drawing: ContractDrawing) -> str:
    return "\n".join([
        f"<section class=\"error-site\" id=\"error-{number}\">",
        f"<h2>{escape(drawing.codes)} at {code(drawing.location)}: the contract of {code(drawing.kernel)}</h2>",
        "<p class=\"legend\"><span class=\"conflict\">the kernel the backend substitutes</span>"
        "<span class=\"culprit\">the tensor in the odd dtype</span>read while the model was built, so the traced "
        "forward does not show it: this is the contract it breaks</p>",
        f"<pre class=\"mermaid\">\n{escape(drawing.mermaid)}</pre>",
        "</section>",
    ])


def legend(drawing: ErrorDrawing) -> str:
    path = drawing.path
    roots = ", ".join(drawing.roots) or "not reached"
    trimmed = f" (trimmed to {len(path.nodes)} nodes)" if path.trimmed else ""
    return (
        "<p class=\"legend\"><span class=\"conflict\">failing op</span>"
        "<span class=\"culprit\">odd dtype and where it comes from</span>"
        f"root cause: {code(roots)}{escape(trimmed)}</p>"
    )


def fix_section(result: FixResult) -> str:
    parts = ["<section class=\"fix\">", "<h2>Fix</h2>"]
    if result.plan.changes:
        rows = ["<tr>" + "".join(f"<td>{code(cell) if column == 0 else escape(cell)}</td>"
                                 for column, cell in enumerate(row)) + "</tr>" for row in fix_rows(result)]
        parts.append(table("fix", FIX_COLUMNS, rows))
    parts += [f"<p class=\"note\">note: {escape(note)}</p>" for note in fix_notes(result)]
    parts += [f"<p class=\"outcome\">{escape(line)}</p>" for line in fix_outcome(result)]
    return "\n".join([*parts, "</section>"])


def code(text: str) -> str:
    """A name as code that a narrow column wraps after a dot (``model.<wbr>layers.<wbr>0``), not mid-word."""
    return "<code>" + escape(text).replace(".", ".<wbr>") + "</code>"


@cache
def mermaid_js() -> str:
    return (files("dtypelint") / "vendor" / "mermaid.min.js").read_text(encoding="utf-8")


def inline_script(source: str) -> str:
    """Script text that cannot end its <script> element early or make the parser skip the real end: every
    ``<script`` and ``</script`` starts with ``\\x3C`` instead of ``<``, the same character to JavaScript
    in strings, templates and regular expressions (where minified code has them)."""
    return re.sub(r"<(/?script)", r"\\x3C\1", source, flags=re.IGNORECASE)
