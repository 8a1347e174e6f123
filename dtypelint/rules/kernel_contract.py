"""Kernel contracts: the rules that backend packs declare (``[[contract]]`` entries in ``rules/*.toml``)."""

from __future__ import annotations

from collections.abc import Iterator
from fnmatch import fnmatchcase

from dtypelint.report import Finding, Fix
from dtypelint.rules.base import Rule, RuleContext
from dtypelint.rules.packs import Contract
from dtypelint.rules.sites import Operand, parent


class ContractRule(Rule):
    """A rule made from one contract of a backend pack; its docs are the contract's fields."""

    category = "kernel-contract"
    category_summary = "A backend kernel's documented dtype contract is broken."

    def __init__(self, contract: Contract, pack: str) -> None:
        self.contract = contract
        self.pack = pack
        self.code = contract.code
        self.name = contract.name
        self.severity = contract.severity
        self.fix_availability = "sometimes" if contract.fix == "cast" else "never"

    @property
    def summary(self) -> str:
        return self.contract.summary

    @property
    def docs(self) -> str:
        contract = self.contract
        sections = [
            ("What it does", contract.summary),
            ("Why is this bad?", contract.why),
            ("Example", contract.example),
            ("Fix safety", _fix_safety(contract)),
            ("Known problems", contract.known_problems),
            ("Contract", _contract_table(contract, self.pack)),
            ("References", "\n".join(f"- {reference}" for reference in contract.references)),
        ]
        return "\n\n".join(f"## {title}\n{text.strip()}" for title, text in sections if text.strip()) + "\n"

    def check(self, context: RuleContext) -> Iterator[Finding]:
        contract, model = self.contract, context.model
        if contract.model_types and model.model_type not in contract.model_types:
            return
        if contract.head_dims and model.head_dim is not None and model.head_dim not in contract.head_dims:
            return  # the backend's Python gate takes its unfused path for this head size
        for path, class_name in model.modules.items():
            if self._applies(path, class_name, model.modules):
                yield from self._check_module(context, path)

    def _applies(self, path: str, class_name: str, modules: dict[str, str]) -> bool:
        contract = self.contract
        if not any(fnmatchcase(class_name, pattern) for pattern in contract.modules):
            return False
        owner = modules.get(parent(path)) if path else None
        if contract.owner and not (owner and fnmatchcase(owner, contract.owner)):
            return False
        return not (contract.not_owner and owner and fnmatchcase(owner, contract.not_owner))

    def _check_module(self, context: RuleContext, path: str) -> Iterator[Finding]:
        contract, sites = self.contract, context.sites
        reference = sites.resolve(contract.must_match, path)[:1] if contract.must_match else []
        operands = [operand for selector in contract.tensors for operand in sites.resolve(selector, path)]
        if not operands:
            return  # the module holds no such operand, or never ran
        gate = (reference or operands)[0].dtype
        if contract.gate_dtypes and gate not in contract.gate_dtypes:
            return  # the backend's Python gate keeps this dtype off the fused kernel
        accepted = contract.accepted_dtypes
        if reference and accepted and reference[0].dtype not in accepted:
            yield self._unsupported(path, reference[0], operands)
            return
        for operand in operands:
            if reference and operand.dtype != reference[0].dtype:
                yield self._mismatch(path, operand, reference[0])
            elif not reference and accepted and operand.dtype not in accepted:
                yield self._unsupported(path, operand, [operand])

    def _unsupported(self, path: str, culprit: Operand, operands: list[Operand]) -> Finding:
        accepted = ", ".join(self.contract.accepted_dtypes)
        return self.finding(
            location=path,
            tensor=operands[0].name,
            op=self.contract.kernel,
            dtypes=sorted({culprit.dtype, *(operand.dtype for operand in operands)}),
            message=f"{self.contract.kernel} supports only {accepted}; {self._name(culprit)} is {culprit.dtype}"
            + self._where(culprit),
            node=culprit.node,
        )

    def _mismatch(self, path: str, operand: Operand, reference: Operand) -> Finding:
        contract = self.contract
        fix = None
        if contract.fix == "cast" and operand.name:
            cost = f": {contract.fix_cost}" if contract.fix_cost else ""
            fix = Fix((operand.name,), reference.dtype, contract.fix_safety, f"cast to {reference.dtype}{cost}")
        return self.finding(
            location=path,
            tensor=operand.name,
            op=contract.kernel,
            dtypes=sorted({operand.dtype, reference.dtype}),
            message=f"{contract.kernel} needs {operand.label} ({operand.dtype}) to match "
            f"{self._name(reference)}, {reference.dtype}{self._where(reference)}",
            fix=fix,
            node=operand.node,
        )


    def _name(self, operand: Operand) -> str:
        """How messages call an operand: the contract's label for the reference (``the query/key dtype``)."""
        is_reference = self.contract.must_match_label and not operand.name and operand.label.startswith("the activation")
        return f"the {self.contract.must_match_label}" if is_reference else operand.label

    def _where(self, operand: Operand) -> str:
        return f" ({operand.label})" if self._name(operand) != operand.label else ""


def _fix_safety(contract: Contract) -> str:
    if contract.fix == "none":
        return "No automatic fix."
    text = f"The fix casts the operand to the reference dtype; it is {contract.fix_safety}."
    return f"{text} {contract.fix_cost}" if contract.fix_cost else text


def _contract_table(contract: Contract, pack: str) -> str:
    rows = [
        ("pack", pack),
        ("kernel", contract.kernel),
        ("modules", ", ".join(contract.modules)),
        ("owner", contract.owner or ""),
        ("not owner", contract.not_owner or ""),
        ("model types", ", ".join(contract.model_types)),
        ("operands", ", ".join(contract.tensors)),
        ("must match", contract.must_match or ""),
        ("accepted dtypes", ", ".join(contract.accepted_dtypes)),
        ("gate dtypes", ", ".join(contract.gate_dtypes)),
        ("head dims", ", ".join(map(str, contract.head_dims))),
    ]
    return "\n".join(f"- {key}: {value}" for key, value in rows if value)
