"""The performance issue's GPU row, for a session lent a GPU: 100M and 1B bfloat16 Llamas (seq 512) on CUDA,
plain forward, the recording-mode floor, the Tracer, and ``audit`` without and with value statistics, in one
process, each as a ratio to the plain forward (goal: audit <= 2.5x). Under five minutes on one H100.

    python benchmarks/gpu_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import forward_runs, llama, medians

SIZES = {"100M": (768, 12, 12, 2048), "1B": (2048, 16, 32, 8192)}


def synchronized(run: Callable[[], object]) -> Callable[[], None]:
    def timed() -> None:
        run()
        torch.cuda.synchronize()

    return timed


def gpu_rows(repeats: int) -> None:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, (hidden, layers, heads, intermediate) in SIZES.items():
        model = llama(hidden, layers, heads, intermediate, 32000, torch.bfloat16).cuda()
        inputs = {"input_ids": torch.randint(0, 32000, (1, 512), device="cuda")}
        runs = {run_name: synchronized(run) for run_name, run in forward_runs(model, inputs).items()}
        times = medians(runs, repeats)
        plain = times["plain"]
        cells = ", ".join(f"{run_name} {times[run_name] / plain:.2f}x" for run_name in runs if run_name != "plain")
        print(f"{name} bf16 Llama, seq 512: plain {plain * 1e3:.1f} ms; {cells} (goal: audit <= 2.5x)")
        del model
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    gpu_rows(options.repeats)


if __name__ == "__main__":
    main()
