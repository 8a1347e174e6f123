"""Stage 4 of the pipeline: the rule engine.

Each rule is one module of this package with its docs in ruff's sections. Backend packs
(``dtypelint.packs.schema``) add the kernel contracts of one backend. ``run_rules`` applies the
selection (``select`` / ``ignore`` / ``extend-select``, per-location ignores, severity overrides).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase

from dtypelint.diagnostics import SEVERITIES, Applicability, Finding, Severity
from dtypelint.errors import LoadError, UsageError
from dtypelint.packs.schema import BackendPack, load_pack
from dtypelint.rules.base import Rule, RuleContext
from dtypelint.rules.kernel_contract import ContractRule
from dtypelint.shipped import available_packs


def _discover() -> tuple[Rule, ...]:
    """One instance of every rule class the package's rule modules define, in code order: adding a
    generic rule is adding one module. A class without a code of its own (``ContractRule``: one instance
    per pack contract) is not a generic rule."""
    rules = []
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        rules += [
            value() for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, Rule) and value.__module__ == module.__name__
            and "code" in vars(value)
        ]
    return tuple(sorted(rules, key=lambda rule: rule.code))


GENERIC_RULES = _discover()


def _categories() -> dict[str, str]:
    """Every finding category and what it means: the summary of the first rule that reports it."""
    categories: dict[str, str] = {}
    for rule in GENERIC_RULES:
        categories.setdefault(rule.category, rule.summary)
    return categories | {ContractRule.category: ContractRule.category_summary}


CATEGORIES = _categories()


def pack_rules(pack: BackendPack) -> list[Rule]:
    return [ContractRule(contract, contract.pack or pack.name) for contract in pack.contracts]


def all_rules(packs: list[BackendPack] | None = None) -> list[Rule]:
    """The generic rules and the contracts of ``packs`` (default: every shipped pack)."""
    if packs is None:
        packs = [load_pack(name) for name in available_packs()]
    rules = [*GENERIC_RULES, *(rule for pack in packs for rule in pack_rules(pack))]
    in_use = {(rule.code, _source(rule)) for rule in rules}
    unused = [rule for rule in _shipped_rules() if (rule.code, _source(rule)) not in in_use]
    _refuse_duplicates([*GENERIC_RULES, *unused, *rules[len(GENERIC_RULES):]])  # a pack file is the one blamed
    return rules


@functools.cache
def _shipped_rules() -> tuple[Rule, ...]:
    """Every shipped pack's contracts: a code or name of a pack file is checked against these too."""
    return tuple(rule for name in available_packs() for rule in pack_rules(load_pack(name)))


def _refuse_duplicates(rules: list[Rule]) -> None:
    """A code or name is one rule's: a pack contract coded like a generic rule (or like another pack's)
    would be shown by ``explain`` as one and switched off by ``--ignore`` as both."""
    owners: dict[tuple[str, str], Rule] = {}
    for rule in rules:
        for kind, key in (("code", rule.code), ("name", rule.name)):
            owner = owners.setdefault((kind, key), rule)
            if owner is not rule:
                taken = f"pack {owner.pack}'s ({_source(owner)})" if owner.pack else "a generic rule's"
                raise LoadError(f"{_source(rule)}: contract {rule.code}: {kind} {key!r} is already {taken}")


def _source(rule: Rule) -> str:
    """The pack file a contract rule comes from."""
    contract = getattr(rule, "contract", None)
    return str(contract.source) if contract is not None and contract.source else f"pack {rule.pack}"


def find_rule(code_or_name: str) -> Rule:
    for rule in all_rules():
        if code_or_name.upper() == rule.code or code_or_name == rule.name:
            return rule
    raise UsageError(f"unknown rule {code_or_name!r}; `dtypelint rules` lists them")


def _matches(rule: Rule, selector: str) -> bool:
    return selector == "ALL" or rule.code.startswith(selector.upper()) or selector == rule.name


@dataclass
class Selection:
    """Which rules run and how loud they are. Selectors are codes, code prefixes (``DT1``) or names."""

    select: list[str] | None = None
    extend_select: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    per_location_ignores: dict[str, list[str]] = field(default_factory=dict)
    severity: dict[str, str] = field(default_factory=dict)

    def validate(self, rules: list[Rule]) -> None:
        """Reject selectors that match none of ``rules`` (pass every backend's: one pyproject.toml may
        configure several) and unknown severities."""
        if self.select is not None and not self.select and not self.extend_select:
            raise UsageError("select names no rule, so every rule would be off (an unset variable?); "
                             "leave select out to run the default rules")
        if not isinstance(self.per_location_ignores, Mapping) or not all(
            isinstance(glob, str) and isinstance(codes, list) and all(isinstance(code, str) for code in codes)
            for glob, codes in self.per_location_ignores.items()
        ):
            raise UsageError(f"per_location_ignores maps module globs to lists of codes, not "
                             f"{self.per_location_ignores!r:.200}")
        if not isinstance(self.severity, Mapping) or not all(
            isinstance(selector, str) and isinstance(level, str) for selector, level in self.severity.items()
        ):
            raise UsageError(f"severity maps codes to severities, not {self.severity!r:.200}")
        selectors = [*(self.select or []), *self.extend_select, *self.ignore, *self.severity]
        selectors += [code for codes in self.per_location_ignores.values() for code in codes]
        for selector in selectors:
            if not any(_matches(rule, selector) for rule in rules):
                raise UsageError(f"selector {selector!r} matches no rule; `dtypelint rules` lists them")
        for selector, severity in self.severity.items():
            if severity not in SEVERITIES:
                raise UsageError(f"severity {severity!r} for {selector!r} is not one of {', '.join(SEVERITIES)}")

    def enabled(self, rule: Rule) -> bool:
        selected = self.select is None or any(_matches(rule, selector) for selector in self.select)
        selected = selected or any(_matches(rule, selector) for selector in self.extend_select)
        return selected and not any(_matches(rule, selector) for selector in self.ignore)

    def severity_of(self, rule: Rule) -> Severity:
        chosen = [severity for selector, severity in self.severity.items() if _matches(rule, selector)]
        return Severity(chosen[-1]) if chosen else rule.severity

    def ignored_at(self, rule: Rule, location: str) -> bool:
        return any(
            fnmatchcase(location, pattern) and any(_matches(rule, selector) for selector in selectors)
            for pattern, selectors in self.per_location_ignores.items()
        )


def run_rules(context: RuleContext, selection: Selection | None = None, rules: list[Rule] | None = None) -> list[Finding]:
    """The findings of ``rules`` (default: the generic rules and the contracts of the context's pack)."""
    selection = selection or Selection()
    rules = rules if rules is not None else all_rules([context.pack])
    findings: list[Finding] = []
    for rule in rules:
        if not selection.enabled(rule) or (rule.uses_value_statistics and not context.graph.graph["stats"]):
            continue  # deselected, or nothing to look at (meta mode, stats=False)
        severity = selection.severity_of(rule)
        for finding in rule.check(context):
            if not selection.ignored_at(rule, finding.location):
                # An override sets the level of the rule's findings; one the rule lowered itself stays lower.
                lowered = finding.severity != rule.severity
                findings.append(finding if lowered else replace(finding, severity=severity))
    return _one_safety_per_cast(findings)


def _one_safety_per_cast(findings: list[Finding]) -> list[Finding]:
    """One cast, one safety: a cast that one finding shows to be safe (the op cannot run without it) is
    safe under every finding that proposes it, as a fix of several tensors is when all of them are."""
    safe = {(name, f.fix.to_dtype): f.code for f in findings if f.fix and f.fix.safety == Applicability.SAFE for name in f.fix.tensors}
    agreed = []
    for finding in findings:
        fix = finding.fix
        if fix and fix.tensors and fix.safety == Applicability.UNSAFE and all((name, fix.to_dtype) in safe
                                                                             for name in fix.tensors):
            proof = safe[fix.tensors[0], fix.to_dtype]
            fix = replace(fix, safety=Applicability.SAFE, description=f"{fix.description} (safe: {proof} shows the op cannot "
                                                         f"run without it)")
            finding = replace(finding, fix=fix)
        agreed.append(finding)
    return agreed
