"""``markdown``: for a pull-request comment.

A heading with the summary line, a table of the findings, the notes, a Mermaid drawing of the path from
the root cause to each error (``dtypelint.drawing``, the drawings the HTML page shows), and after ``--fix``
the fix: its casts, notes and outcome. Names are code spans, other text has its ASCII punctuation
backslash-escaped: nothing from the model renders as markup.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from dtypelint.diagnostics import CODE_COLUMNS, FINDING_COLUMNS, ROOT_LOCATION
from dtypelint.formats.base import FormatContext, audited, grouped, notes
from dtypelint.formats.fix import FIX_COLUMNS, fix_notes, fix_outcome, fix_rows

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dtypelint.plan import FixResult
    from dtypelint.report import Report


def render_markdown(report: Report, context: FormatContext) -> str:
    """Every text from the model is literal: names in code spans, the rest with its punctuation escaped."""
    shown = audited(report, context)
    lines = [f"### dtypelint: {md_literal(shown.summary_line())}", ""]
    if shown.findings:
        lines += table(FINDING_COLUMNS, [
            [md_code(cell, in_table=True) if column in CODE_COLUMNS and cell else md_literal(cell)
             for column, cell in zip(FINDING_COLUMNS, finding.cells(), strict=True)]
            for finding in grouped(shown).ordered()
        ])
    else:
        lines.append("No findings.")
    if shown.notes or shown.loaded_line():
        lines += ["", *(f"- {md_literal(line)}" for line in notes(shown))]
    lines += _drawings(grouped(shown))  # one drawing per cause
    if context.fix is not None:
        lines += _fix(context.fix)
    return "\n".join(lines)


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GFM table of cells already escaped."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _drawings(report: Report) -> list[str]:
    from dtypelint.drawing import error_drawings  # torch's op vocabulary: not at the CLI's start

    drawings = error_drawings(report)
    lines = []
    for drawing in drawings.drawn:
        trimmed = f" (trimmed to {len(drawing.path.nodes)} nodes)" if drawing.path.trimmed else ""
        lines += ["", f"#### {md_literal(drawing.codes)} at {md_code(drawing.location, in_table=False)}: "
                      f"{md_literal(drawing.site)}{md_literal(trimmed)}",
                  "", "```mermaid", drawing.mermaid.rstrip("\n"), "```"]
    for contract in drawings.contracts:
        lines += ["", f"#### {md_literal(contract.codes)} at {md_code(contract.location, in_table=False)}: the contract "
                      f"of {md_code(contract.kernel, in_table=False)} (its tensor is read while the model is built)",
                  "", "```mermaid", contract.mermaid.rstrip("\n"), "```"]
    if drawings.more:
        lines += ["", f"_{drawings.more} more error sites not drawn._"]
    if drawings.unplaced:
        lines += ["", "Not drawn, naming nothing the traced forward used:", ""]
        lines += [f"- {md_literal(finding.code)} at {md_code(finding.location or ROOT_LOCATION, in_table=False)}"
                  + (f": {md_code(finding.tensor, in_table=False)}" if finding.tensor else "")
                  for finding in drawings.unplaced]
    return lines


def _fix(result: FixResult) -> list[str]:
    lines = ["", "#### Fix", ""]
    if result.plan.changes:
        rows = [[md_code(row[0], in_table=True), *map(md_literal, row[1:])] for row in fix_rows(result)]
        lines += [*table(FIX_COLUMNS, rows), ""]
    lines += [f"- note: {md_literal(note)}" for note in fix_notes(result)]
    lines += [f"**{md_literal(line)}**" if number == 0 else md_literal(line)
              for number, line in enumerate(fix_outcome(result))]
    return lines


# CommonMark lets a backslash escape any ASCII punctuation character (and only those).
_MD_PUNCTUATION = re.compile(r"[!-/:-@\[-`{-~]")


def md_literal(text: str) -> str:
    """Printable text (``escape.printable``) as literal Markdown, in a table cell too: every ASCII
    punctuation character backslash-escaped, so no emphasis, link, image, HTML, code span or column break
    starts (GFM takes ``\\|`` for a pipe inside a cell)."""
    return _MD_PUNCTUATION.sub(r"\\\g<0>", text)


def md_code(text: str, *, in_table: bool) -> str:
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


def md_cell(text: str) -> str:
    """dtypelint's own Markdown (a rule's summary) in a table cell: no HTML, no column breaks, one line."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return " ".join(text.replace("|", "\\|").split())
