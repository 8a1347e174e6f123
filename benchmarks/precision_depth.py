"""The precision advisor against model depth, and its memory on a 1B-parameter model.

1. Depth: Llamas of 2, 8 and 32 layers (hidden 64), one planted MLP (its up projection times 3e5, its down
   projection divided: float32 outputs unchanged, float16 overflows in between). For each: the forwards
   ``dtypelint.precision`` ran (against the depth: a search that tried each block would need one forward
   per block), its wall time over one plain float32 forward of the same model (the baseline, measured in
   the same run), and the output error against a float64 reference of everything in float16, of the plan,
   and of everything in float32.
2. ``--memory``: a ~1B-parameter Llama (hidden 2048, 16 layers) in float32, one planted MLP: the plan, the
   process's peak resident memory over the model's own bytes (the advisor's bound: one extra copy in
   float16, half of that), and whether it swapped.

    python benchmarks/precision_depth.py [--memory]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from common import llama

SCALE = 3e5


def planted(layers: int, hidden: int = 64, intermediate: int = 128, vocab: int = 256) -> torch.nn.Module:
    model = llama(hidden, layers, 4, intermediate, vocab, torch.float32)
    mlp = model.model.layers[layers // 2].mlp
    with torch.no_grad():
        mlp.up_proj.weight.mul_(SCALE)
        mlp.down_proj.weight.div_(SCALE)
    return model


def depth_table() -> None:
    import dtypelint

    inputs = {"input_ids": torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))}
    print(f"{'layers':>6} {'blocks':>6} {'forwards':>8} {'forwards/blocks':>15} {'wall s':>7} {'x forward':>9} "
          f"{'err all fp16':>12} {'err plan':>9} {'err all fp32':>12}  keep")
    for layers in (2, 8, 32):
        model = planted(layers)
        with torch.no_grad():
            model(**inputs)  # warm-up
            start = time.perf_counter()
            model(**inputs)
            forward = time.perf_counter() - start
        start = time.perf_counter()
        plan = dtypelint.precision(model, inputs, torch.float16, reference=torch.float64)
        wall = time.perf_counter() - start
        blocks = layers + 4  # embed_tokens, rotary_emb, the layers, norm, lm_head
        print(f"{layers:>6} {blocks:>6} {plan.forwards:>8} {plan.forwards / blocks:>15.2f} {wall:>7.2f} "
              f"{wall / forward:>9.0f} {plan.error['all']:>12.3g} {plan.error['plan']:>9.3g} "
              f"{_all_float32_error(model, inputs):>12.3g}  {','.join(plan.keep)}")


def _all_float32_error(model: torch.nn.Module, inputs: dict) -> float:
    import copy

    with torch.no_grad():
        reference = copy.deepcopy(model).double()(**inputs).logits
        output = model(**inputs).logits.double()
    return float((output - reference).abs().max() / reference.abs().max())


def memory() -> None:
    import dtypelint

    model = planted(16, hidden=2048, intermediate=5504, vocab=32000)
    size = sum(tensor.numel() * tensor.element_size() for tensor in [*model.parameters(), *model.buffers()])
    inputs = {"input_ids": torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(1))}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    swaps = _swapped()
    start = time.perf_counter()
    plan = dtypelint.precision(model, inputs, torch.float16)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"1B model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {size / 2**30:.2f} GiB "
          f"in float32; plan {plan.keep} in {plan.forwards} forwards, {wall:.0f} s")
    print(f"peak resident {peak / 2**30:.2f} GiB = {peak / size:.2f}x the model (before planning "
          f"{before / 2**30:.2f} GiB); extra {max(peak - before, 0) / size:.2f}x the model; "
          f"swapped pages during the plan: {_swapped() - swaps}")


def _swapped() -> int:
    with open("/proc/vmstat") as stats:
        return sum(int(line.split()[1]) for line in stats if line.startswith("pswpout"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", action="store_true", help="also plan a 1B-parameter model and report memory")
    options = parser.parse_args()
    depth_table()
    if options.memory:
        memory()


if __name__ == "__main__":
    main()
