"""Output formats: one module per format over the one violation model (``Report`` / ``Finding``), as
ruff's ``render/`` has one file per format.

``render(report, format, path=..., fix=...)`` returns the text to print; ``FORMATS`` maps each format name
to its renderer, a function of ``(Report, FormatContext) -> str`` (``formats.base``). A format's module is
imported when the format is first rendered: the command line reads the names at start.

========  ======================  ===============================================================
format    module                  what it is
========  ======================  ===============================================================
text      ``text``                the table when it fits the terminal, else ``concise``; next steps
concise   ``text``                one line per finding
full      ``text``                always the table, names never cut
json      ``json_output``         ``Report.to_dict()`` (the keys are documented there)
sarif     ``sarif``               SARIF 2.1.0 for code scanning
github    ``github``              GitHub Actions workflow commands (annotations)
markdown  ``markdown``            a pull-request comment, with a Mermaid drawing of each error
html      ``html``                one self-contained page that opens offline
========  ======================  ===============================================================

After ``--fix`` every format shows the same thing (``base.audited``): the findings and summary of the
audit the fix started from, then the fix (``formats.fix``: the casts, what each cost, the outcome and the
re-audit's summary). ``path`` is the audited checkpoint directory or config file: SARIF and the GitHub
annotations name it as the artifact the findings are about.

Module, parameter and buffer names, op names of the model's code and the exceptions it raised are any text.
The formats people read (all but ``json`` and ``sarif``) render a copy of the report in which each of them
is printable (``dtypelint.escape``: control characters, newlines, bidi overrides and undecodable bytes as
``repr`` escapes them), then escape it for their syntax. ``json`` keeps every text exact, ``sarif`` escapes
only undecodable bytes (SARIF is UTF-8). ``catalog`` renders the rule catalog (``dtypelint rules``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dtypelint.errors import UsageError
from dtypelint.formats.base import FormatContext, Renderer, for_people

if TYPE_CHECKING:
    from dtypelint.plan import FixResult
    from dtypelint.report import Report
    from dtypelint.rules.base import Rule


def _format(module: str, function: str, *, people_read_it: bool = True) -> Renderer:
    """The renderer ``function`` of ``dtypelint.formats.<module>``, imported on first use."""

    def render_format(report: Report, context: FormatContext) -> str:
        renderer: Renderer = getattr(importlib.import_module(f"dtypelint.formats.{module}"), function)
        return (for_people(renderer) if people_read_it else renderer)(report, context)

    render_format.__name__ = function
    return render_format


# ``dtypelint precision``'s formats (``formats.precision``).
PRECISION_FORMATS = ("text", "json", "markdown", "html")

FORMATS: dict[str, Renderer] = {
    "text": _format("text", "render_text"),
    "concise": _format("text", "render_concise"),
    "full": _format("text", "render_full"),
    "json": _format("json_output", "render_json", people_read_it=False),
    "sarif": _format("sarif", "render_sarif", people_read_it=False),
    "github": _format("github", "render_github"),
    "markdown": _format("markdown", "render_markdown"),
    "html": _format("html", "render_html"),
}


def render(
    report: Report, format: str = "text", *, path: str | Path | None = None, rules: Sequence[Rule] | None = None,
    fix: FixResult | None = None,
) -> str:
    """The report in ``format`` (a key of ``FORMATS``). ``path``: the audited checkpoint or config, named
    as the artifact by ``sarif`` and ``github``. ``rules``: the rules listed by ``sarif`` and named by
    ``github`` (default: the generic rules and every shipped pack's contracts). ``fix``: what ``--fix``
    did (``dtypelint.fix``), shown by every format after the findings of the audit it started from."""
    try:
        renderer = FORMATS[format]
    except KeyError:
        raise UsageError(f"unknown format {format!r}; one of {', '.join(FORMATS)}") from None
    return renderer(report, FormatContext(path=path, rules=rules, fix=fix))
