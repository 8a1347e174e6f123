"""Audit overhead and meta-mode cost, measured in one run.

1. A ~100M-parameter Llama (hidden 768, 12 layers, seq 128): median wall time of a plain forward and of
   ``dtypelint.audit`` on the same input, interleaved, and their ratio (goal <= 1.2).
2. The Llama-3-70B config in meta mode (a fresh process, so its peak RSS is its own): wall time of
   ``audit_config`` after imports, and peak RSS (goal <= 3 s and <= 1 GB).

    python benchmarks/audit_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_70B = ROOT / "examples" / "configs" / "llama-3-70b"


def overhead(repeats: int) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import dtypelint

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=12, vocab_size=32000, max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (1, 128))}
    parameters = sum(p.numel() for p in model.parameters())

    def plain() -> None:
        with torch.no_grad():
            model(**inputs)

    runs = {
        "forward": plain,
        "audit": lambda: dtypelint.audit(model, inputs),
        "audit_no_stats": lambda: dtypelint.audit(model, inputs, stats=False),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"parameters_m": parameters / 1e6, **medians}


def meta_70b() -> dict[str, float]:
    # "After imports": torch, transformers and Llama's modeling code, which dtypelint imports on first use.
    import transformers.models.llama.modeling_llama  # noqa: F401

    import dtypelint
    import dtypelint.audit  # noqa: F401

    start = time.perf_counter()
    report = dtypelint.audit_config(CONFIG_70B, dtype="float16")
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "ops": sum(1 for _ in report.graph.ops())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--meta-only", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.meta_only:
        print(json.dumps(meta_70b()))
        return
    result = overhead(options.repeats)
    forward = result["forward"]
    print(
        f"100M Llama, seq 128 ({result['parameters_m']:.0f}M parameters, median of {options.repeats}): "
        f"forward {forward * 1000:.0f} ms; audit {result['audit'] * 1000:.0f} ms, "
        f"ratio {result['audit'] / forward:.2f}; audit without value statistics "
        f"{result['audit_no_stats'] * 1000:.0f} ms, ratio {result['audit_no_stats'] / forward:.2f} (goal <= 1.2)"
    )
    child = subprocess.run(
        [sys.executable, __file__, "--meta-only"], check=True, capture_output=True, text=True
    )
    meta = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        f"Llama-3-70B config, meta mode: {meta['seconds']:.2f} s after imports ({meta['ops']} ops), "
        f"peak RSS {meta['peak_rss_mb']:.0f} MB (goals <= 3 s, <= 1024 MB)"
    )


if __name__ == "__main__":
    main()
