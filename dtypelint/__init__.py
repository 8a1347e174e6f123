"""dtypelint: find dtype conflicts in PyTorch models before the backend does.

Pipeline: ``load`` -> ``trace`` -> ``graph`` -> ``rules`` -> ``report`` | ``fix``.
"""

from dtypelint.audit import audit, audit_config, trace
from dtypelint.errors import DtypelintError, LoadError, UsageError
from dtypelint.fix import FixPlan, FixResult, apply_plan, fix, plan_fixes, save_fixed
from dtypelint.graph import DtypeGraph
from dtypelint.report import CATEGORIES, Finding, Fix, Report
from dtypelint.trace import Tracer

__all__ = [
    "CATEGORIES",
    "DtypeGraph",
    "DtypelintError",
    "Finding",
    "Fix",
    "FixPlan",
    "FixResult",
    "LoadError",
    "Report",
    "Tracer",
    "UsageError",
    "apply_plan",
    "audit",
    "audit_config",
    "fix",
    "plan_fixes",
    "save_fixed",
    "trace",
]
