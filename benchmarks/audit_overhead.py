"""Every row of the performance issue's goal table, each as a ratio against a floor measured in the same run.

1. Launch-bound: a tiny float16 Llama (hidden 64, 8 layers, seq 4, one thread). Floor: a bare
   ``TorchDispatchMode`` that records each op's input dtypes. dtypelint's ``audit`` without and with
   value statistics, over that floor (goals <= 1.3x, <= 1.5x); the tracer alone is shown too.
2. A ~100M Llama (hidden 768, 12 layers, seq 128, float32): ``audit`` over a plain forward (goal <= 1.2x).
3. Whole process: ``dtypelint check CONFIG --mode meta -q`` for the Llama-3-70B and 405B configs over the
   import floor ``python -c "import torch, transformers.models.llama.modeling_llama"``, alternating runs
   (goals <= 1.25x, <= 1.35x).
4. Memory per recorded op: what the tracer holds after 10^4+ ops, by tracemalloc (goal <= 1 KB).
5. Where CUDA is available, the GPU row (``gpu_overhead.py``): 100M and 1B bf16 Llamas (goal <= 2.5x).

Timed runs are interleaved and medians reported: absolute times move on shared machines, ratios less.

    python benchmarks/audit_overhead.py [--repeats 5] [--skip-process]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import torch
from common import forward_runs, llama, medians

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"70B": ROOT / "examples" / "configs" / "llama-3-70b", "405B": ROOT / "examples" / "configs" / "llama-3.1-405b"}


def launch_bound(repeats: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = llama(64, 8, 4, 128, 128, torch.float16)
        times = medians(forward_runs(model, {"input_ids": torch.randint(0, 128, (1, 4))}), repeats * 4)
    finally:
        torch.set_num_threads(threads)
    floor = times["floor"]
    print(f"1. tiny fp16 Llama, 1 thread: plain {times['plain'] * 1e3:.1f} ms, recording floor {floor * 1e3:.1f} ms "
          f"({floor / times['plain']:.2f}x plain)")
    print(f"   Tracer alone {times['tracer'] / floor:.2f}x floor; audit without statistics "
          f"{times['audit_no_stats'] / floor:.2f}x floor (goal <= 1.3); with statistics {times['audit'] / floor:.2f}x "
          f"(goal <= 1.5)")


def hundred_million(repeats: int) -> None:
    model = llama(768, 12, 12, 2048, 32000, torch.float32)
    runs = forward_runs(model, {"input_ids": torch.randint(0, 32000, (1, 128))})
    times = medians({name: runs[name] for name in ("plain", "floor", "audit")}, repeats)
    print(f"2. ~100M fp32 Llama, seq 128: plain {times['plain'] * 1e3:.0f} ms; audit {times['audit'] / times['plain']:.2f}x "
          f"plain (goal <= 1.2); recording floor {times['floor'] / times['plain']:.2f}x plain")


def whole_process(repeats: int) -> None:
    floor_command = [sys.executable, "-c", "import torch, transformers.models.llama.modeling_llama"]
    commands = {"import floor": floor_command}
    commands |= {name: [sys.executable, "-m", "dtypelint", "check", str(path), "--mode", "meta", "-q"]
                 for name, path in CONFIGS.items()}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            start = time.perf_counter()
            status = subprocess.run(command, capture_output=True, cwd=ROOT).returncode
            times[name].append(time.perf_counter() - start)
            if status not in (0, 1):
                raise SystemExit(f"{' '.join(command)} exited {status}")
    floor = statistics.median(times["import floor"])
    cells = ", ".join(f"{name} {statistics.median(times[name]):.1f} s = {statistics.median(times[name]) / floor:.2f}x"
                      for name in CONFIGS)
    print(f"3. whole-process meta check over the import floor ({floor:.1f} s): {cells} (goals <= 1.25x, <= 1.35x)")


def memory_per_op() -> None:
    import dtypelint

    model = llama(64, 8, 4, 128, 128, torch.float16)
    inputs = {"input_ids": torch.randint(0, 128, (1, 4))}
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    with torch.no_grad(), dtypelint.Tracer(model, stats=True) as tracer:
        for _ in range(40):
            model(**inputs)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"4. memory held per recorded op: {held / len(tracer.records):.0f} bytes over {len(tracer.records)} ops "
          f"(goal <= 1024)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-process", action="store_true", help="leave out the whole-process rows (slow)")
    options = parser.parse_args()
    launch_bound(options.repeats)
    hundred_million(options.repeats)
    if not options.skip_process:
        whole_process(max(3, options.repeats // 2))
    memory_per_op()
    if torch.cuda.is_available():
        from gpu_overhead import gpu_rows

        print("5. GPU:", end=" ")
        gpu_rows(options.repeats)


if __name__ == "__main__":
    main()
