"""Check the cuda pack against a real GPU: run each contract's scenarios on CUDA and compare the outcome
(raised or ran, output dtype, warnings) with what dtypelint predicts from a CPU trace of the same code.

    .venv/bin/python benchmarks/cuda_probe.py [--json results.json]

Needs only torch with CUDA and dtypelint (flash-attn and apex scenarios run when those are installed,
and are reported as skipped otherwise). Takes well under a minute; prints one table row per scenario and
exits 1 when a prediction disagrees with the GPU. Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

H, BF, F32 = torch.float16, torch.bfloat16, torch.float32


class Norm(nn.Module):
    def __init__(self, kind: str, weight_dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = (nn.LayerNorm(64) if kind == "layer" else nn.GroupNorm(4, 8)).to(weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class Attention(nn.Module):
    """SDPA on given q/k/v/mask; on CUDA with ``flash`` set, flash-attn's own function instead."""

    def __init__(self, flash: bool = False) -> None:
        super().__init__()
        self.flash = flash

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        if self.flash and q.is_cuda:
            from flash_attn import flash_attn_func

            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class NormedFlash(nn.Module):
    """A diffusers-style processor: q/k from norms (float32 under autocast), v from a linear (bf16)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_q, self.norm_k, self.to_v = nn.LayerNorm(64), nn.LayerNorm(64), nn.Linear(64, 64)
        self.attention = Attention(flash=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (1, 64)).transpose(1, 2)  # noqa: E731
        return self.attention(split(self.norm_q(x)), split(self.norm_k(x)), split(self.to_v(x)))


class ApexNorm(nn.Module):
    def __init__(self, weight_dtype: torch.dtype) -> None:
        super().__init__()
        from apex.normalization import FusedRMSNorm

        self.norm = FusedRMSNorm(64).to(weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def qkv(dtype: torch.dtype, head_dim: int, mask: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    q = torch.randn(1, 4, 32, head_dim, dtype=dtype)
    if mask is None:
        return q, q.clone(), q.clone()
    additive = torch.ones(1, 1, 32, 32, dtype=torch.bool).tril() if mask == torch.bool else torch.zeros(1, 1, 32, 32, dtype=mask)
    return q, q.clone(), q.clone(), additive


def forced(*backends: SDPBackend) -> Callable[[str], Any]:
    return lambda device: sdpa_kernel(list(backends))


def autocast(dtype: torch.dtype) -> Callable[[str], Any]:
    return lambda device: torch.autocast(device, dtype=dtype)  # CPU autocast stands in for CUDA's in the trace


@dataclass
class Scenario:
    code: str  # the contract it exercises
    name: str
    build: Callable[[], tuple[nn.Module, tuple]]
    context: Callable[[str], Any] = lambda device: contextlib.nullcontext()
    flash: bool = False  # a flash-attention deployment
    needs: tuple[str, ...] = field(default_factory=tuple)


SCENARIOS = [
    Scenario("CUDA101", "layer_norm fp16 input, fp32 weight", lambda: (Norm("layer", F32), (torch.randn(4, 64, dtype=H),))),
    Scenario("CUDA101", "layer_norm bf16 input, fp32 weight", lambda: (Norm("layer", F32), (torch.randn(4, 64, dtype=BF),))),
    Scenario("CUDA101", "layer_norm fp16 input, fp16 weight", lambda: (Norm("layer", H), (torch.randn(4, 64, dtype=H),))),
    Scenario("CUDA101", "layer_norm fp32 input, fp16 weight", lambda: (Norm("layer", H), (torch.randn(4, 64),))),
    Scenario("CUDA101", "group_norm bf16 input, fp32 weight", lambda: (Norm("group", F32), (torch.randn(2, 8, 16, dtype=BF),))),
    Scenario("CUDA101", "layer_norm fp16 input, fp32 weight, autocast", lambda: (Norm("layer", F32), (torch.randn(4, 64, dtype=H),)),
             autocast(H)),
    Scenario("CUDA103", "sdpa fp16 q, fp32 mask, head_dim 64", lambda: (Attention(), qkv(H, 64, F32))),
    Scenario("CUDA103", "sdpa fp16 q, fp32 mask, head_dim 512", lambda: (Attention(), qkv(H, 512, F32))),
    Scenario("CUDA103", "sdpa bf16 q, fp32 mask, head_dim 512", lambda: (Attention(), qkv(BF, 512, F32))),
    Scenario("CUDA103", "sdpa fp16 q, bool mask, head_dim 512", lambda: (Attention(), qkv(H, 512, torch.bool))),
    Scenario("CUDA103", "sdpa fp16 q, fp16 mask, head_dim 512", lambda: (Attention(), qkv(H, 512, H))),
    Scenario("CUDA103", "sdpa fp32 q, fp32 mask, head_dim 512", lambda: (Attention(), qkv(F32, 512, F32))),
    Scenario("CUDA103", "sdpa fp32, forced flash", lambda: (Attention(), qkv(F32, 64)), forced(SDPBackend.FLASH_ATTENTION)),
    Scenario("CUDA103", "sdpa fp16, forced flash", lambda: (Attention(), qkv(H, 64)), forced(SDPBackend.FLASH_ATTENTION)),
    Scenario("CUDA103", "sdpa fp16 + mask, forced flash", lambda: (Attention(), qkv(H, 64, H)), forced(SDPBackend.FLASH_ATTENTION)),
    Scenario("CUDA103", "sdpa fp16 head_dim 512, forced flash", lambda: (Attention(), qkv(H, 512)), forced(SDPBackend.FLASH_ATTENTION)),
    Scenario("CUDA103", "sdpa fp16 + fp32 mask, forced efficient", lambda: (Attention(), qkv(H, 64, F32)),
             forced(SDPBackend.EFFICIENT_ATTENTION)),
    Scenario("CUDA103", "sdpa fp16 + fp32 mask, forced cuDNN", lambda: (Attention(), qkv(H, 64, F32)),
             forced(SDPBackend.CUDNN_ATTENTION)),
    Scenario("CUDA103", "sdpa fp32 + fp32 mask, forced math", lambda: (Attention(), qkv(F32, 64, F32)), forced(SDPBackend.MATH)),
    Scenario("CUDA102", "flash_attn fp32", lambda: (Attention(flash=True), qkv(F32, 64)), flash=True, needs=("flash_attn",)),
    Scenario("CUDA102", "flash_attn bf16", lambda: (Attention(flash=True), qkv(BF, 64)), flash=True, needs=("flash_attn",)),
    Scenario("CUDA102", "flash_attn bf16 head_dim 512", lambda: (Attention(flash=True), qkv(BF, 512)), flash=True,
             needs=("flash_attn",)),
    Scenario("CUDA102", "flash_attn under bf16 autocast, q/k from fp32 norms", lambda: (NormedFlash(), (torch.randn(1, 32, 64),)),
             autocast(BF), flash=True, needs=("flash_attn",)),
    Scenario("CUDA105", "apex FusedRMSNorm fp16 weight, fp32 input", lambda: (ApexNorm(H), (torch.randn(4, 64),)), needs=("apex",)),
    Scenario("CUDA105", "apex FusedRMSNorm fp16 weight, fp16 input", lambda: (ApexNorm(H), (torch.randn(4, 64, dtype=H),)),
             needs=("apex",)),
]


def to_cuda(value: Any) -> Any:
    return value.cuda() if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages: list[str] = []
        yield messages
        messages += sorted({str(w.message).splitlines()[0][:100] for w in caught})


def on_gpu(scenario: Scenario) -> dict[str, Any]:
    model, inputs = scenario.build()
    model, inputs = model.cuda().eval(), tuple(to_cuda(value) for value in inputs)
    with recorded_warnings() as messages, torch.no_grad(), scenario.context("cuda"):
        try:
            output = model(*inputs)
            torch.cuda.synchronize()
            outcome = {"outcome": "ran", "dtype": str(output.dtype).removeprefix("torch.")}
        except Exception as error:  # noqa: BLE001 - the outcome being measured
            outcome = {"outcome": "raised", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    return {**outcome, "warnings": messages}


def predicted(scenario: Scenario) -> dict[str, Any]:
    import dtypelint
    from dtypelint.flash_standin import flash_standin

    model, inputs = scenario.build()
    deployment = flash_standin(model, "flash_attention_2") if scenario.flash else contextlib.nullcontext()
    with deployment, scenario.context("cpu"):
        report = dtypelint.audit(model.eval(), inputs, backend="cuda")
    errors = [f for f in report.errors if f.code == scenario.code]
    notes = [f.message[:100] for f in report.findings if f.pack == "cuda" and f.severity == "info"]
    return {"outcome": "raised" if errors else "ran", "message": errors[0].message[:120] if errors else "",
            "info": notes}


def missing(scenario: Scenario) -> list[str]:
    return [name for name in scenario.needs if importlib.util.find_spec(name) is None]


def run(scenario: Scenario) -> dict[str, Any]:
    row: dict[str, Any] = {"code": scenario.code, "scenario": scenario.name}
    if absent := missing(scenario):
        return {**row, "agree": "skipped", "gpu": {"outcome": f"{', '.join(absent)} not installed"}}
    row["predicted"], row["gpu"] = predicted(scenario), on_gpu(scenario)
    row["agree"] = "yes" if row["predicted"]["outcome"] == row["gpu"]["outcome"] else "NO"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("cuda_probe: CUDA is not available here; nothing to measure")
        return 0
    from tabulate import tabulate

    started = time.perf_counter()
    rows = [run(scenario) for scenario in SCENARIOS]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    table = [
        (row["code"], row["scenario"], row.get("predicted", {}).get("outcome", "-"), row["gpu"]["outcome"],
         row["gpu"].get("dtype") or row["gpu"].get("error", ""), row["agree"])
        for row in rows
    ]
    print(tabulate(table, headers=("contract", "scenario", "predicted", "GPU", "dtype / error", "agree"),
                   maxcolwidths=[None, 45, None, None, 60, None]))
    disagree = [row for row in rows if row["agree"] == "NO"]
    print(f"{len(rows)} scenarios, {sum(r['agree'] == 'yes' for r in rows)} agree, {len(disagree)} disagree, "
          f"{sum(r['agree'] == 'skipped' for r in rows)} skipped, {time.perf_counter() - started:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
