"""Kernel contracts: the rules that backend packs declare (``[[contract]]`` entries in ``rules/*.toml``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase

from dtypelint.attention import DIFFUSERS_BACKEND, AttentionCall, is_flash
from dtypelint.diagnostics import Finding, Fix
from dtypelint.packs.operands import Operand, attention_operands, parent
from dtypelint.packs.schema import Contract
from dtypelint.packs.sdpa_dispatch import predict
from dtypelint.rules.base import Rule, RuleContext


@dataclass(frozen=True)
class Site:
    """One place a contract checks: a module, an op call or an attention call, and its operand resolver."""

    location: str
    resolve: Callable[[str], list[Operand]]
    call: AttentionCall | None = None


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
        for site in self._sites(context):
            yield from self._check_site(site, frozenset(model.keep_in_fp32_modules))

    def _sites(self, context: RuleContext) -> Iterator[Site]:
        contract, graph, sites, modules = self.contract, context.graph, context.sites, context.model.modules
        if contract.site == "module":
            for path, class_name in modules.items():
                if self._applies(path, class_name, modules):
                    yield Site(path, lambda selector, path=path: sites.resolve(selector, path))
        elif contract.site == "op":
            names = {f"aten.{op}" for op in contract.ops}
            for op in graph.ops():
                path = graph.op(op)["module"]
                if graph.op(op)["name"] in names and self._in_modules(modules.get(path, "")):
                    yield Site(path, lambda selector, op=op: sites.op_operands(op, selector))
        else:
            for call in graph.graph.get("attention_calls", ()):
                if self._takes(call) and self._in_modules(modules.get(call.module, "")):
                    yield Site(call.module, lambda selector, call=call: attention_operands(call, selector), call)

    def _applies(self, path: str, class_name: str, modules: dict[str, str]) -> bool:
        contract = self.contract
        if not any(fnmatchcase(class_name, pattern) for pattern in contract.modules):
            return False
        owner = modules.get(parent(path)) if path else None
        if contract.owner and not (owner and fnmatchcase(owner, contract.owner)):
            return False
        return not (contract.not_owner and owner and fnmatchcase(owner, contract.not_owner))

    def _check_site(self, site: Site, kept_fp32: frozenset[str]) -> Iterator[Finding]:
        contract, path = self.contract, site.location
        if site.call is not None:
            yield from self._check_call(site.call)
        reference = site.resolve(contract.must_match)[:1] if contract.must_match else []
        operands = [operand for selector in contract.tensors for operand in site.resolve(selector)]
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
                yield self._mismatch(path, operand, reference[0], kept_fp32)
            elif not reference and accepted and operand.dtype not in accepted:
                yield self._unsupported(path, operand, [operand])

    def _in_modules(self, class_name: str) -> bool:
        patterns = self.contract.modules
        return not patterns or any(fnmatchcase(class_name, pattern) for pattern in patterns)

    def _takes(self, call: AttentionCall) -> bool:
        wanted, implementation = self.contract.calls, call.implementation
        kind = ("flash" if is_flash(implementation) else
                "diffusers" if implementation.startswith(DIFFUSERS_BACKEND) else "sdpa")
        return wanted in ("any", kind)

    def _check_call(self, call: AttentionCall) -> Iterator[Finding]:
        contract, where = self.contract, call.module
        if contract.calls == "diffusers" and call.refused:
            backend = call.implementation.removeprefix(DIFFUSERS_BACKEND)
            yield self.finding(location=where, op=contract.kernel, dtypes=sorted({call.query, call.key, call.value}),
                               message=f"diffusers' {backend} backend refuses the attention of {where or '<model>'} "
                               f"(q {call.query}, k {call.key}, v {call.value}, head_dim {call.head_dim}): "
                               f"{call.refused.rstrip('.')}")
        if contract.max_head_dim and call.head_dim > contract.max_head_dim:
            yield self.finding(location=where, op=contract.kernel, dtypes=[call.query],
                               message=f"{contract.kernel} supports head_dim up to {contract.max_head_dim}; "
                               f"the attention of {where or '<model>'} has head_dim {call.head_dim}")
        if contract.dispatch is None or (dispatch := predict(call)) is None:
            return
        why = f" ({'; '.join(dispatch.passed_over)})" if dispatch.passed_over else ""
        forced = f" with only {', '.join(call.enabled_backends)} enabled (sdpa_kernel)" if call.forced else ""
        dtypes = sorted({call.query, *([call.mask] if call.mask else [])})
        if contract.dispatch == "raises" and dispatch.error:
            taken = f"takes the {dispatch.kernel} kernel and " if dispatch.kernel else "finds no kernel: "
            yield self.finding(location=where, op=contract.kernel, dtypes=dtypes,
                               message=f"on CUDA, SDPA{forced} {taken}{dispatch.error}{why}")
        elif contract.dispatch == "falls-back" and not dispatch.error and dispatch.kernel != "flash":
            yield self.finding(location=where, op=contract.kernel, dtypes=dtypes,
                               message=f"on CUDA this attention runs the {dispatch.kernel} kernel, not flash{why}")

    def finding(self, *, message: str, **fields: object) -> Finding:
        hint = f"; {self.contract.hint}" if self.contract.hint else ""
        return super().finding(message=message + hint, **fields)  # type: ignore[arg-type]

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

    def _mismatch(self, path: str, operand: Operand, reference: Operand, kept_fp32: frozenset[str]) -> Finding:
        contract = self.contract
        fix, intent = None, ""
        if operand.name and kept_fp32 & set(operand.name.split(".")):
            # The model's own code keeps it wide (_keep_in_fp32_modules): casting it would undo that intent.
            intent = (f"; the model keeps {operand.name} in {operand.dtype} on purpose (_keep_in_fp32_modules): "
                      f"cast the kernel's {reference.dtype} input to {operand.dtype} instead")
        elif contract.fix == "cast" and operand.name:
            cost = f": {contract.fix_cost}" if contract.fix_cost else ""
            fix = Fix((operand.name,), reference.dtype, contract.fix_safety, f"cast to {reference.dtype}{cost}")
        return self.finding(
            location=path,
            tensor=operand.name,
            op=contract.kernel,
            dtypes=sorted({operand.dtype, reference.dtype}),
            message=f"{contract.kernel} needs {operand.label} ({operand.dtype}) to match "
            f"{self._name(reference)}, {reference.dtype}{self._where(reference)}{intent}",
            fix=fix,
            node=operand.node,
        )


    def _name(self, operand: Operand) -> str:
        """How messages call an operand: the contract's label for the reference (``the query/key dtype``)."""
        is_reference = self.contract.must_match_label and not operand.name and operand.label.startswith("the ")
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
        ("sites", contract.site if contract.site != "module" else ""),
        ("ops", ", ".join(contract.ops)),
        ("attention calls", contract.calls if contract.site == "attention" else ""),
        ("max head_dim", str(contract.max_head_dim or "")),
        ("SDPA dispatch", contract.dispatch or ""),
    ]
    return "\n".join(f"- {key}: {value}" for key, value in rows if value)
