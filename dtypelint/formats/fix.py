"""What ``--fix`` did, as every format shows it after the findings of the audit it started from
(``base.audited``): the casts and what each cost, the notes, and the outcome with the re-audit's summary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtypelint.plan import FixResult

FIX_COLUMNS = ("tensor", "cast", "code", "safety", "output max abs / rel change", "cos/sin max error")


def fix_rows(result: FixResult) -> list[tuple[str, ...]]:
    """One row per planned cast: the tensor, the cast, the rule, its safety and what it cost the output."""
    rows = []
    for change in result.plan.changes:
        cost = result.output_change.get(change.code)
        rows.append((
            change.tensor, f"{change.from_dtype} -> {change.to_dtype}", change.code, change.safety,
            "n/a" if cost is None else f"{cost[0]:.3g} / {cost[1]:.3g}",
            f"{result.rope_error[change.tensor]:.3g}" if change.tensor in result.rope_error else "",
        ))
    return rows


def fix_table(result: FixResult) -> str:
    from tabulate import tabulate

    return tabulate(fix_rows(result), headers=FIX_COLUMNS, tablefmt="simple", disable_numparse=True)


def fix_notes(result: FixResult) -> list[str]:
    """Why a measured output change of 0 is not the whole story, and what the caller added."""
    if not result.unread or not result.applied:
        return list(result.remarks)
    unread = result.unread
    named = ", ".join(unread[:2]) + (f" and {len(unread) - 2} more" if len(unread) > 2 else "")
    note = (f"the audited forward never read {named} (it computes from values cached at load, as RoPE's "
            f"cos/sin in transformers 4.x), so its output cannot show the cast; a kernel that reads the "
            f"tensor directly computes with the cast value")
    if any(name in result.rope_error for name in unread):
        note += ": the cos/sin max error above is what it will see"
    return [note, *result.remarks]


def fix_outcome(result: FixResult) -> list[str]:
    """The outcome line (``cast 2 tensors; re-audit: ...``), and where the fixed model went."""
    lines = [result.summary_line()]
    if result.saved:
        lines.append(f"saved the fixed model and its fix plan to {result.saved}")
    elif result.not_saved:
        lines.append(f"nothing saved: no fix was applied, so {result.not_saved} was not written")
    return lines


def fix_text(result: FixResult) -> str:
    """The fix as the text formats print it: the casts, the notes, the outcome."""
    lines = [fix_table(result)] if result.plan.changes else []
    lines += [f"note: {note}" for note in fix_notes(result)]
    return "\n".join([*lines, *fix_outcome(result)])


def fix_dict(result: FixResult) -> dict[str, Any]:
    """The fix as JSON-ready data (``json``'s ``fix`` key, SARIF's run property): the casts, their cost,
    the outcome and the re-audit's summary and findings (None when it did not run)."""
    after = result.after
    return {
        "applied": bool(result.changed),
        "rolled_back": result.rolled_back,
        "reason": result.reason,
        "outcome": result.summary_line(),
        "changes": result.plan.to_dict()["changes"],
        "output_change": result.output_change,
        "rope_error": result.rope_error,
        "unread": result.unread,
        "notes": fix_notes(result),
        "saved": str(result.saved) if result.saved else None,
        "after": None if after is None else {
            "summary": after.counts(), "findings": [finding.to_dict() for finding in after.findings],
        },
    }
