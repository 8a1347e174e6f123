"""Every diffusers model class, built from its default config on the meta device and audited in meta mode
with the inputs ``dtypelint.diffusion.component_inputs`` makes for it: which classes build, which get
inputs, which trace to the end, and the internal errors and changed models (both must be 0).

Each class runs in its own process with a timeout. Value mode is covered by the tiny checkpoints of
``tests/test_diffusers.py``: default configs are full size.

    python benchmarks/diffusers_sweep.py [--jobs 2] [--timeout 120] [--json FILE] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def model_classes() -> list[str]:
    import diffusers
    from diffusers.models.modeling_utils import ModelMixin

    names = []
    for name in dir(diffusers):
        try:
            value = getattr(diffusers, name)
        except Exception:  # noqa: BLE001 - an optional dependency diffusers lacks here
            continue
        if isinstance(value, type) and issubclass(value, ModelMixin) and value is not ModelMixin:
            names.append(name)
    return sorted(names)


def audit_one(name: str) -> dict:
    """One class: build (default config, meta device, float16), inputs, meta audit; what happened."""
    import diffusers
    import torch

    import dtypelint
    from dtypelint.diffusion import component_inputs
    from dtypelint.errors import DtypelintError
    from dtypelint.fake import new_fake_mode

    row: dict = {"class": name}
    try:
        with torch.device("meta"):
            model = getattr(diffusers, name)().to(torch.float16).eval()
    except Exception as error:  # noqa: BLE001 - a class whose defaults do not build is not ours to judge
        row["stage"] = "build"
        row["why"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        return row
    config_before = json.dumps(dict(model.config), sort_keys=True, default=str)
    try:
        with new_fake_mode():
            inputs = component_inputs(model, batch=1, dtype=torch.float16)
    except DtypelintError as error:
        row["stage"] = "inputs"
        row["why"] = str(error)[:200]
        return row
    try:
        report = dtypelint.audit(model, inputs, mode="meta", dtype="float16")
    except DtypelintError as error:
        row["stage"] = "usage"
        row["why"] = str(error)[:200]
        return row
    except Exception as error:  # noqa: BLE001 - an internal error of dtypelint: what the sweep counts
        row["stage"] = "internal"
        row["why"] = f"{type(error).__name__}: {error}"[:300]
        return row
    row["stage"] = "audited"
    row["findings"] = sorted(f"{finding.code} {finding.severity} {finding.location}" for finding in report.findings)
    row["complete"] = not report.by_code("DT002") and not report.by_code("DT001")
    row["changed_config"] = json.dumps(dict(model.config), sort_keys=True, default=str) != config_before
    return row


def run(name: str, timeout: float) -> dict:
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"class": name, "stage": "crashed", "why": done.stderr[-300:]}
    except subprocess.TimeoutExpired:
        row = {"class": name, "stage": "timeout"}
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated class names")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    if options.one:
        print(json.dumps(audit_one(options.one)))
        return 0
    names = options.only.split(",") if options.only else model_classes()
    with ThreadPoolExecutor(options.jobs) as pool:
        rows = list(pool.map(lambda name: run(name, options.timeout), names))
    for row in rows:
        detail = row.get("why") or ", ".join(f for f in row.get("findings", []) if " info " not in f)[:160]
        print(f"{row['class']:<44} {row['stage']:<9} {row['seconds']:>6}s  {detail}")
    stages = Counter(row["stage"] for row in rows)
    totals = {"classes": len(rows), **stages, "complete": sum(bool(row.get("complete")) for row in rows),
              "internal_errors": stages.get("internal", 0) + stages.get("crashed", 0),
              "changed_config": sum(bool(row.get("changed_config")) for row in rows)}
    print(json.dumps(totals))
    if options.json:
        options.json.write_text(json.dumps({"totals": totals, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
