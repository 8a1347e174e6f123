"""dtypelint: find dtype conflicts in PyTorch models before the backend does.

Pipeline: ``load`` -> ``trace`` -> ``graph`` -> ``rules`` -> ``report`` | ``fix``.

The public names are imported on first use: ``import dtypelint`` (which pytest does for the plugin at
every start) must not cost the seconds that importing torch takes.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtypelint.audit import audit, audit_config, trace
    from dtypelint.errors import DtypelintError, LoadError, UsageError
    from dtypelint.fix import FixPlan, FixResult, apply_plan, fix, plan_fixes
    from dtypelint.graph import DtypeGraph
    from dtypelint.report import Finding, Fix, Report
    from dtypelint.rules import CATEGORIES
    from dtypelint.save import save_fixed
    from dtypelint.trace import Tracer

_PUBLIC = {
    "audit": "dtypelint.audit",
    "audit_config": "dtypelint.audit",
    "trace": "dtypelint.audit",
    "DtypelintError": "dtypelint.errors",
    "LoadError": "dtypelint.errors",
    "UsageError": "dtypelint.errors",
    "FixPlan": "dtypelint.fix",
    "FixResult": "dtypelint.fix",
    "apply_plan": "dtypelint.fix",
    "fix": "dtypelint.fix",
    "plan_fixes": "dtypelint.fix",
    "save_fixed": "dtypelint.save",
    "DtypeGraph": "dtypelint.graph",
    "CATEGORIES": "dtypelint.rules",
    "Finding": "dtypelint.report",
    "Fix": "dtypelint.report",
    "Report": "dtypelint.report",
    "Tracer": "dtypelint.trace",
}
__all__ = sorted(_PUBLIC)


class _Package(types.ModuleType):
    """Three stages share a name with a function (``audit``, ``fix``, ``trace``). Importing the submodule
    binds it on the package; the package keeps the function instead (``sys.modules`` has the module)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name not in _PUBLIC:
            raise AttributeError(f"module 'dtypelint' has no attribute {name!r}")
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        super().__setattr__(name, value)
        return value

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_PUBLIC))


sys.modules[__name__].__class__ = _Package
