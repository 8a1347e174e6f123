"""A precision plan (``dtypelint precision``) in the formats people read and in JSON: the forecast, where
the error enters and grows, the plan, its verification and how to apply it."""

from __future__ import annotations

import html
import json
import math
from typing import Any

from tabulate import tabulate

from dtypelint.advisor import PrecisionPlan, json_safe
from dtypelint.escape import printable
from dtypelint.formats.markdown import md_code, md_literal
from dtypelint.formats.markdown import table as md_table

MODULE_COLUMNS = ("module", "error", "growth", "max |reference|", "")
SHOWN_MODULES = 12  # rows of the per-module table: the largest errors and growths, in execution order


def render_precision(plan: PrecisionPlan, format: str = "text") -> str:
    if format == "json":
        return json.dumps(json_safe(plan.to_dict()), indent=2, allow_nan=False)
    sections = _sections(plan)
    if format == "markdown":
        return _markdown(plan, sections)
    if format == "html":
        return _html(plan, sections)
    return _text(plan, sections)


def number(value: float | None) -> str:
    return "did not run" if value is None else "inf" if value == math.inf else f"{value:.3g}"


def verdict(plan: PrecisionPlan) -> str:
    if plan.fine_as_is:
        return f"{plan.dtype} is fine as is: error {number(plan.error['all'])} within the tolerance {plan.tolerance:g}"
    if plan.keep:
        return (f"keep {len(plan.keep)} module{'s' if len(plan.keep) != 1 else ''} in float32: error "
                f"{number(plan.error['all'])} all in {plan.dtype}, {number(plan.error['plan'])} with the plan "
                f"(tolerance {plan.tolerance:g}), verified")
    return f"deploy in {plan.recommend}: no plan makes {plan.dtype} work"


def shown_modules(plan: PrecisionPlan) -> list[dict[str, Any]]:
    """The rows that matter: the blocks whose error is largest or grew most, and those the plan keeps from."""
    rows = plan.modules
    if len(rows) <= SHOWN_MODULES:
        return rows
    kept = {row["module"] for row in rows if any(name == row["module"] or name.startswith(f"{row['module']}.")
                                                  for name in plan.keep)}
    ranked = sorted(rows, key=lambda row: (row["module"] not in kept, -_key(row["error"]), -_key(row["growth"])))
    chosen = {id(row) for row in ranked[:SHOWN_MODULES]}
    return [row for row in rows if id(row) in chosen]


def _key(value: float | None) -> float:
    return -1.0 if value is None else value


def _sections(plan: PrecisionPlan) -> dict[str, Any]:
    forecast = [(printable(row.get("module") or row.get("tensor", "")), "module" if "module" in row else "tensor",
                 number(row["max_abs"]), number(row["limit"])) for row in plan.forecast]
    modules = [(printable(row["module"]), number(row["error"]), number(row["growth"]) if row["growth"] else "",
                number(row["max_abs"]) if row.get("max_abs") is not None else "",
                "<- past the tolerance" if row.get("enters") else "") for row in shown_modules(plan)]
    apply = [f"with dtypelint.keep_in_float32(model.to(torch.{plan.recommend}), {plan.keep!r}): ...  (reversible)",
             "or after every load: dtypelint.apply_plan(model, PLAN_FILE)  (write it with --write-plan)"]
    if plan.keep:
        apply.append(f"or in transformers: _keep_in_fp32_modules = {plan.keep_in_fp32_modules()!r} on the model class "
                     "(it matches every module of those names and casts no inputs: the model's code must)")
    return {"forecast": forecast, "modules": modules, "apply": apply if not plan.fine_as_is else []}


def _header(plan: PrecisionPlan) -> str:
    backend = f", backend {plan.backend}" if plan.backend else ""
    return (f"{printable(plan.model)} in {plan.dtype}: output {plan.output}, error = {plan.measure} against "
            f"float32, tolerance {plan.tolerance:g}, {plan.forwards} forwards{backend}")


def _text(plan: PrecisionPlan, sections: dict[str, Any]) -> str:
    lines = [_header(plan), ""]
    if sections["forecast"]:
        lines += [f"forecast from the float32 run: {len(sections['forecast'])} past {plan.dtype}'s safe range",
                  tabulate(sections["forecast"], headers=("name", "kind", "max |value|", "limit")), ""]
    if sections["modules"]:
        lines += [f"where the error enters and grows, all in {plan.dtype}:",
                  tabulate(sections["modules"], headers=MODULE_COLUMNS, disable_numparse=True), ""]
    lines.append(verdict(plan))
    lines += [f"  {printable(name)}" for name in plan.keep]
    lines += [f"note: {printable(note)}" for note in plan.notes]
    if sections["apply"]:
        lines += ["", "apply:", *(f"  {line}" for line in sections["apply"])]
    return "\n".join(lines)


def _markdown(plan: PrecisionPlan, sections: dict[str, Any]) -> str:
    lines = [f"### dtypelint precision: {md_literal(_header(plan))}", ""]
    if sections["forecast"]:
        lines += ["#### Forecast", "", *md_table(("name", "kind", "max abs", "limit"), [
            (md_code(name, in_table=True), kind, peak, limit) for name, kind, peak, limit in sections["forecast"]]), ""]
    if sections["modules"]:
        lines += ["#### Where the error enters", "", *md_table(("module", "error", "growth", "max abs reference", ""), [
            (md_code(name, in_table=True), *rest) for name, *rest in sections["modules"]]), ""]
    lines += [f"**{md_literal(verdict(plan))}**", ""]
    lines += [f"- {md_code(printable(name), in_table=False)}" for name in plan.keep]
    lines += [f"- note: {md_literal(printable(note))}" for note in plan.notes]
    if sections["apply"]:
        lines += ["", "#### Apply", "", *(f"- {md_literal(line)}" for line in sections["apply"])]
    return "\n".join(lines)


def _html(plan: PrecisionPlan, sections: dict[str, Any]) -> str:
    from dtypelint.formats.html import page, table

    def rows(cells: list[tuple[str, ...]]) -> list[str]:
        return ["<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in cells]

    body = ["<h1>dtypelint precision</h1>", f"<p>{html.escape(_header(plan))}</p>"]
    if sections["forecast"]:
        body += ["<h2>Forecast</h2>", table("forecast", ("name", "kind", "max |value|", "limit"), rows(sections["forecast"]))]
    if sections["modules"]:
        body += ["<h2>Where the error enters</h2>", table("modules", MODULE_COLUMNS, rows(sections["modules"]))]
    body += [f"<p><strong>{html.escape(verdict(plan))}</strong></p>",
             "<ul>" + "".join(f"<li><code>{html.escape(printable(name))}</code></li>" for name in plan.keep) + "</ul>"]
    body += [f"<p>note: {html.escape(printable(note))}</p>" for note in plan.notes]
    if sections["apply"]:
        body += ["<h2>Apply</h2>", "<ul>" + "".join(f"<li><code>{html.escape(line)}</code></li>"
                                                    for line in sections["apply"]) + "</ul>"]
    return page(f"dtypelint precision: {plan.model}", "\n".join(body))
