"""What the timing benchmarks share: the models they time, the recording floor, interleaved medians, and
the runs of one forward (plain, floor, Tracer, audit without and with statistics)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class RecordingFloor(TorchDispatchMode):
    """The floor of any dtype tracer: each op's input dtypes, appended."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        self.ops.append((func, [arg.dtype for arg in args if isinstance(arg, torch.Tensor)]))
        return func(*args, **kwargs)


def llama(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=512)
    return LlamaForCausalLM(config).eval().to(dtype)


def medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def forward_runs(model: torch.nn.Module, inputs: dict) -> dict[str, Callable[[], object]]:
    import dtypelint

    def plain() -> None:
        with torch.no_grad():
            model(**inputs)

    def floor() -> None:
        with torch.no_grad(), RecordingFloor():
            model(**inputs)

    def tracer() -> None:
        with torch.no_grad(), dtypelint.Tracer(model):
            model(**inputs)

    return {
        "plain": plain,
        "floor": floor,
        "tracer": tracer,
        "audit_no_stats": lambda: dtypelint.audit(model, inputs, stats=False),
        "audit": lambda: dtypelint.audit(model, inputs),
    }
