"""``python -m tests.corpus``: run every case through dtypelint and print the recall table and totals."""

from __future__ import annotations

import time

from .cases import CASES
from .runner import run


def verdict(outcome) -> str:
    if outcome.skipped:
        return f"skipped ({outcome.skipped})"
    if outcome.raised or outcome.changed:
        return "AUDIT FAILED"
    if outcome.case.control or outcome.case.fixed_upstream:
        verdict = "clean" if outcome.passed else "FALSE ALARM: " + ", ".join(sorted({f.code for f in outcome.alarms}))
        return f"fixed upstream, {verdict}" if outcome.case.fixed_upstream else verdict
    return "hit" if outcome.passed else "miss"


def main() -> None:
    start = time.perf_counter()
    outcomes = [run(case.id) for case in CASES]
    rows = [("case", "project", "mech", "expected", "result")]
    for outcome in outcomes:
        case = outcome.case
        expected = "clean" if case.control else f"{case.expect.category} {'/'.join(case.expect.names)} ({case.expect.severity})"
        rows.append((case.id, case.project, str(case.mechanism), expected, verdict(outcome)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())

    ran = [o for o in outcomes if not o.skipped]
    bugs = [o for o in ran if not o.case.control and not o.case.fixed_upstream]
    controls = [o for o in ran if o.case.control or o.case.fixed_upstream]
    hits = sum(o.passed for o in bugs)
    alarms = sum(not o.passed for o in controls)
    print()
    print(f"cases: {len(CASES)} ({len(bugs)} bugs and {len(controls)} controls run, bugs fixed upstream counted as controls; {len(CASES) - len(ran)} skipped for a missing pack or library)")
    print(f"reports: {len({c.url for c in CASES})} from {len({c.project for c in CASES})} projects")
    print(f"hit rate: {hits}/{len(bugs)} bugs ({hits / len(bugs):.0%})")
    print(f"false alarms on controls: {alarms}/{len(controls)}")
    print(f"audits that raised or changed the model: {sum(bool(o.raised or o.changed) for o in ran)}")
    print(f"time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
