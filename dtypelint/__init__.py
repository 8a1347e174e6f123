"""dtypelint: find dtype conflicts in PyTorch models before the backend does.

Pipeline: ``load`` -> ``tracer`` -> ``graph`` -> ``rules`` -> ``report`` | ``fixes``; ``pipeline`` runs it
(``audit``, ``audit_config``, ``trace``); ``formats`` renders a report (``render``) and ``drawing`` draws
its graph (``write_graph``).
``advisor`` plans which modules must stay float32 for a float16/bfloat16 deployment (``precision``).

The public names are imported on first use: ``import dtypelint`` (which pytest does for the plugin at
every start) must not cost the seconds that importing torch takes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtypelint.advisor import PrecisionPlan, keep_in_float32, precision
    from dtypelint.diagnostics import Finding, Fix
    from dtypelint.drawing import write_graph
    from dtypelint.errors import DtypelintError, LoadError, UsageError
    from dtypelint.fixes import apply_plan, fix, plan_fixes
    from dtypelint.formats import render
    from dtypelint.graph import DtypeGraph
    from dtypelint.pipeline import audit, audit_config, trace
    from dtypelint.plan import FixPlan, FixResult
    from dtypelint.report import Report
    from dtypelint.rules import CATEGORIES
    from dtypelint.save import save_fixed
    from dtypelint.tracer import Tracer

_PUBLIC = {
    "audit": "dtypelint.pipeline",
    "audit_config": "dtypelint.pipeline",
    "trace": "dtypelint.pipeline",
    "DtypelintError": "dtypelint.errors",
    "LoadError": "dtypelint.errors",
    "UsageError": "dtypelint.errors",
    "FixPlan": "dtypelint.plan",
    "FixResult": "dtypelint.plan",
    "precision": "dtypelint.advisor",
    "PrecisionPlan": "dtypelint.advisor",
    "keep_in_float32": "dtypelint.advisor",
    "apply_plan": "dtypelint.fixes",
    "fix": "dtypelint.fixes",
    "plan_fixes": "dtypelint.fixes",
    "save_fixed": "dtypelint.save",
    "DtypeGraph": "dtypelint.graph",
    "write_graph": "dtypelint.drawing",
    "render": "dtypelint.formats",
    "CATEGORIES": "dtypelint.rules",
    "Finding": "dtypelint.diagnostics",
    "Fix": "dtypelint.diagnostics",
    "Report": "dtypelint.report",
    "Tracer": "dtypelint.tracer",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dtypelint' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
