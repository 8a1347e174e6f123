"""Sweep every architecture of every task mapping of the installed transformers through dtypelint.

A unit is one model class of a task mapping (``MODEL_FOR_<TASK>_MAPPING_NAMES``: causal LM, seq2seq,
masked LM, image classification, speech, ...; each class once, under the first task that lists it, in the
order of ``dtypelint.model_class.TASK_FAMILIES``). For each:

1. build a tiny random config (``AutoConfig.for_model`` with the usual size fields shrunk, nested
   ``text_config`` too) and keep the class only if plain transformers can build it (``_from_config``),
   ``save_pretrained`` it, reload it in float16 and run a forward on ``dtypelint.load.sample_inputs``
   (the inputs its modality needs): those classes are the denominator;
2. audit it six times: value mode (the checkpoint loaded by dtypelint's loader, which must build the very
   class the checkpoint records) and meta mode (``audit_config``), each under ``hf-eager``,
   ``ipex-llm-xpu`` and ``cuda``; an exception escaping ``audit_loaded``/``audit_config`` is a dtypelint
   internal error; after each value audit the model must be unchanged (state_dict and non-persistent
   buffers ``torch.equal``, dtypes, hooks) and no global forward hook may be left;
3. note the rotary layout (a ``*RotaryEmbedding`` owned by an ``*Attention*`` module: per-layer; any
   other: model-level) and check the IPX101 expectation: under ipex-llm-xpu, IPX101 errors appear
   exactly for per-layer architectures holding a float32 ``inv_freq`` whose model_type is in the
   contract's ``model-types``; under hf-eager no error mentions ``inv_freq``.
4. list the errors of the value audits: the plain float16 forward ran, so each is a false error unless
   the model really holds what it says (cuda errors: with the default (sdpa) attention);
5. check that each value audit recorded the ops a bare recording dispatch mode sees on the same model and
   inputs (``tests/helpers.py``: ``dispatched_ops`` against ``recorded_ops``, the first call): the audit
   judged the path the model runs outside it.

Each unit runs in a forked child (imports are paid once) with a wall-clock limit, so a pathological model
cannot hang the sweep.

    .venv/bin/python benchmarks/arch_sweep.py [--task causal_lm,masked_lm | --family vision] [--sample N]
        [--only llama,gpt2] [--jobs 2] [--timeout 90] [--json rows.json] [--workdir DIR [--resume]]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"  # helpers.py: the bare recording mode
SIZE_FIELDS = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2,
    "num_attention_heads": 4, "n_head": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "head_dim": 16,
}
# Tried only when the basic shrink breaks the model in plain transformers: fields that must follow the
# basic ones (MLA ranks, partial rotary dims, encoder/decoder stacks, MoE widths), in every sub-config.
EXTENDED_FIELDS = {
    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16, "qk_head_dim": 32,
    "kv_lora_rank": 32, "q_lora_rank": 32, "rotary_dim": 16,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 64,
    "n_routed_experts": 4, "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "n_positions": 256, "n_ctx": 256,
    "n_layers": 2, "n_heads": 4, "dim": 64, "num_key_value_heads": 4,  # MLA: kv heads == heads
}
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                "cls_token_id", "mask_token_id", "unk_token_id")
BACKENDS = ("hf-eager", "ipex-llm-xpu", "cuda")
MODES = ("value", "meta")
ABBREV = {
    "kernel-contract": "kc", "mixed-input": "mix", "promotion": "prom", "nonfinite": "nonfin",
    "overflow-risk": "ovf", "param-dtype": "param", "low-precision-op": "lowp", "forward-error": "fwd",
    "trace-limit": "limit",
}


# --------------------------------------------------------------------------------------------- config
def _shrunk(config: Any, extended: bool = False) -> dict[str, Any]:
    """The overrides for one (sub)config: the size fields it has, and token ids inside the new vocab."""
    fields = config.to_dict()  # real fields only: a read-only property (falcon's head_dim) is left alone
    table = {**SIZE_FIELDS, **EXTENDED_FIELDS} if extended else SIZE_FIELDS
    overrides = {key: value for key, value in table.items() if key in fields and not isinstance(fields[key], dict)}
    for key in TOKEN_FIELDS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= SIZE_FIELDS["vocab_size"]:
            overrides[key] = SIZE_FIELDS["vocab_size"] - 1 - TOKEN_FIELDS.index(key)
        elif isinstance(value, list) and any(isinstance(v, int) and v >= SIZE_FIELDS["vocab_size"] for v in value):
            overrides[key] = [v if v < SIZE_FIELDS["vocab_size"] else SIZE_FIELDS["vocab_size"] - 1 for v in value]
    return overrides


def _fix_lists(config: Any) -> None:
    """Per-layer lists (layer_types, ...) that outlived the layer-count override."""
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int):
        return
    for key in ("layer_types", "mlp_layer_types", "layers_block_type"):
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) != layers and value:
            setattr(config, key, (value * layers)[:layers])


def _subconfigs(config: Any, extended: bool) -> list[str]:
    """The nested configs to shrink: text_config, and with ``extended`` every nested config."""
    from transformers import PretrainedConfig

    names = [k for k, v in vars(config).items() if isinstance(v, PretrainedConfig)]
    return names if extended else [n for n in names if n == "text_config"]


def tiny_config(model_type: str, extended: bool = False) -> tuple[Any, str]:
    """A tiny config for ``model_type``: rebuilt through ``for_model`` with the overrides (so derived
    fields follow), else the defaults patched with setattr. Returns the config and how it was made."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    overrides = _shrunk(default, extended)
    nested = _subconfigs(default, extended)
    for name in nested:
        sub = getattr(default, name)
        overrides[name] = {**sub.to_dict(), **_shrunk(sub, extended)}
    how = "for_model" + ("+extended" if extended else "")
    try:
        config = AutoConfig.for_model(model_type, **overrides)
    except Exception:  # noqa: BLE001 - fall back to patching the defaults
        how = "setattr" + ("+extended" if extended else "")
        config = AutoConfig.for_model(model_type)
        for target in [config, *(getattr(config, name) for name in nested)]:
            for key, value in _shrunk(target, extended).items():
                try:
                    setattr(target, key, value)
                except (AttributeError, TypeError):
                    pass
    for target in [config, *(getattr(config, name) for name in _subconfigs(config, True))]:
        _fix_lists(target)
    return config, how


# --------------------------------------------------------------------------------------------- checks
def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}"


def _frames(error: BaseException) -> dict[str, str]:
    """The dtypelint frame the exception came through last, and the innermost frame overall."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/dtypelint/" in f.filename.replace("\\", "/") and "benchmarks" not in f.filename]
    where = lambda f: f"{f.filename.split('/dtypelint/')[-1] if '/dtypelint/' in f.filename else f.filename}:{f.lineno} in {f.name}"  # noqa: E731
    return {
        "dtypelint_frame": f"dtypelint/{where(ours[-1])}" if ours else "",
        "dtypelint_line": ours[-1].line if ours else "",
        "innermost_frame": where(frames[-1]) if frames else "",
    }


def snapshot(model: Any) -> dict[str, Any]:
    import torch

    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "buffers": {k: (b.detach().clone(), b.dtype) for k, b in model.named_buffers()},
        "params": {k: (p.dtype, p.device, p.requires_grad) for k, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "default_dtype": torch.get_default_dtype(),
        "grad": torch.is_grad_enabled(),
    }


def changes(model: Any, before: dict[str, Any]) -> list[str]:
    """What an audit changed: tensors, dtypes, module state, hooks (per-module and global)."""
    import torch
    from torch.nn.modules import module as nn_module

    after = snapshot(model)
    found = []
    if before["state"].keys() != after["state"].keys():
        found.append("state_dict keys")
    for key, tensor in before["state"].items():
        other = after["state"].get(key)
        if other is not None and (other.dtype != tensor.dtype or not torch.equal(other, tensor)):
            found.append(f"state_dict[{key}]")
    for key, (tensor, dtype) in before["buffers"].items():
        other = after["buffers"].get(key)
        if other is None or other[1] != dtype or not torch.equal(other[0], tensor):
            found.append(f"buffer {key}")
    if before["params"] != after["params"]:
        found.append("parameter dtype/device/requires_grad")
    for key in ("training", "hooks", "default_dtype", "grad"):
        if before[key] != after[key]:
            found.append(key)
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        if len(getattr(nn_module, name, {}) or {}):
            found.append(f"{name} not empty")
    return found[:10]


def global_hooks_left() -> list[str]:
    from torch.nn.modules import module as nn_module

    return [n for n in ("_global_forward_hooks", "_global_forward_pre_hooks")
            if len(getattr(nn_module, n, {}) or {})]


def rotary_layout(model: Any) -> dict[str, Any]:
    """per-layer: some *RotaryEmbedding is owned by an *Attention* module; model-level: rotary modules
    exist but none is; none: no rotary module. With the dtypes of their inv_freq buffers."""
    owners = {}
    for name, module in model.named_modules():
        for child_name in dict(module.named_children()):
            owners[f"{name}.{child_name}" if name else child_name] = type(module).__name__
    per_layer, model_level = [], []
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        buffers = [b for n, b in module.named_buffers(recurse=False) if n.endswith("inv_freq")]
        dtypes = sorted({str(b.dtype).replace("torch.", "") for b in buffers})  # gemma3: <layer_type>_inv_freq
        dtype = "float32" if "float32" in dtypes else (dtypes[0] if dtypes else None)
        entry = {"module": name, "class": type(module).__name__, "owner": owners.get(name), "inv_freq": dtype}
        (per_layer if "Attention" in (owners.get(name) or "") else model_level).append(entry)
    layout = "per-layer" if per_layer else "model-level" if model_level else "none"
    return {
        "layout": layout,
        "per_layer_fp32": any(e["inv_freq"] == "float32" for e in per_layer),
        "inv_freq": sorted({e["inv_freq"] or "-" for e in per_layer + model_level}),
        "rotary": (per_layer + model_level)[:2],
    }


def summarize(report: Any) -> dict[str, Any]:
    findings = report.findings
    codes = {f.code for f in findings}
    return {
        "error": (report.graph.graph.get("error") or None) and " ".join(str(report.graph.graph["error"]).split())[:300],
        "categories": dict(Counter(f.category for f in findings)),
        "codes": dict(Counter(f.code for f in findings)),
        "DT001": "DT001" in codes,
        "DT002": "DT002" in codes,
        "ipx101_errors": [f"{f.location}: {f.message}"[:200] for f in findings
                          if f.code == "IPX101" and f.severity == "error"],
        "inv_freq_errors": [f"{f.code} {f.location}: {f.message}"[:200] for f in findings
                            if f.severity == "error" and "inv_freq" in f"{f.tensor} {f.message}"],
        "cuda_errors": [f"{f.code} {f.location}: {f.message}"[:200] for f in findings
                        if f.pack == "cuda" and f.severity == "error"],
        "errors": [f"{f.code} {f.location}: {f.message}"[:200] for f in findings if f.severity == "error"],
        # every finding whole, to compare two sweeps (a refactor must leave them identical)
        "findings": sorted(f"{f.code} {f.severity} {f.location} {f.tensor} {f.pack} {f.message}" for f in findings),
    }


# --------------------------------------------------------------------------------------------- child
class Recorder:
    """The child's result, rewritten to disk after every stage so a timeout still shows where it was."""

    def __init__(self, path: Path, model_type: str) -> None:
        self.path = path
        self.row: dict[str, Any] = {"arch": model_type, "stage": "start", "times": {}}
        self.t0 = time.perf_counter()

    def stage(self, name: str) -> None:
        self.row["stage"] = name
        self.flush()

    def flush(self) -> None:
        self.row["elapsed"] = round(time.perf_counter() - self.t0, 2)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.row, default=str))
        os.replace(tmp, self.path)


def check_architecture(unit: dict[str, str], rec: Recorder) -> None:
    import torch
    import transformers
    from helpers import dispatched_ops, first_difference, recorded_ops

    import dtypelint
    from dtypelint.config import Settings
    from dtypelint.load import Request, dtype_keyword, load, sample_inputs
    from dtypelint.packs.schema import load_pack
    from dtypelint.pipeline import audit_loaded

    model_type, class_name = unit["model_type"], unit["class"]

    row = rec.row
    row.update(unit)
    try:
        model_class = getattr(transformers, class_name)
    except Exception as error:  # noqa: BLE001 - a class whose backend (timm, ...) is not installed
        row["builds"], row["skip"] = False, f"import: {_short(error, 160)}"
        rec.stage("skipped")
        return
    ipx101 = next(c for c in load_pack("ipex-llm-xpu").contracts if c.code == "IPX101")

    def timed(name: str, fn: Any) -> Any:
        rec.stage(name)
        start = time.perf_counter()
        try:
            return fn()
        finally:
            row["times"][name] = round(time.perf_counter() - start, 2)

    # 1. plain transformers: the denominator (basic shrink; if that breaks the model, the extended one)
    row["builds"], failures = False, []
    for extended in (False, True):
        try:
            config, row["config_how"] = timed("config", lambda: tiny_config(model_type, extended))
            torch.manual_seed(0)
            model = timed("from_config", lambda: model_class._from_config(copy.deepcopy(config)))
            checkpoint = tempfile.mkdtemp(prefix="checkpoint-")  # in the child's scratch directory
            timed("save", lambda: model.save_pretrained(checkpoint))
            del model
            model = timed("reload", lambda: model_class.from_pretrained(
                checkpoint, **{dtype_keyword(): torch.float16}).eval())
            inputs = sample_inputs(model, config, batch=1, seq_len=8)
            row["inputs"] = {name: f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for name, t in inputs.items()}
            with torch.no_grad():
                timed("forward", lambda: model(**inputs))
            break
        except Exception as error:  # noqa: BLE001
            failures.append(f"{'extended ' if extended else ''}{row['stage']}: {_short(error, 160)}")
            model = None
    else:
        row["skip"] = " | ".join(failures)
        rec.stage("skipped")
        return
    if failures:
        row["basic_shrink_failed"] = failures[0]
    row["builds"] = True
    row["model_type"] = getattr(model.config, "model_type", None)
    try:  # transformers 5 heterogeneous configs (gemma4) raise on a global per-layer attribute
        row["head_dim"] = getattr(model.config, "head_dim", None)
    except Exception as error:  # noqa: BLE001
        row["head_dim"] = f"<{type(error).__name__}>"
    row.update(rotary_layout(model))
    row["ipx101_listed"] = row["model_type"] in ipx101.model_types
    row["ipx101_expected"] = bool(row["per_layer_fp32"] and row["ipx101_listed"])

    # 2. the six audits: value mode through the loader (the class the checkpoint records), meta mode
    row["audits"], row["changed"], row["internal"], row["substituted"], row["ops_differ"] = {}, {}, [], [], {}
    del model
    loaded = load(Request(path=Path(checkpoint), mode="value", dtype=torch.float16, batch=1, seq_len=8))
    model = loaded.model
    with torch.no_grad():  # transformers 5 installs its output-capturing hooks at the first forward: not ours
        model(**loaded.inputs)
    dispatched = timed("dispatched", lambda: dispatched_ops(model, loaded.inputs))
    if loaded.model_class != class_name or type(model).__name__ != class_name:
        row["substituted"].append(f"value: {loaded.model_class} / {type(model).__name__}")
    for mode in MODES:
        for backend in BACKENDS:
            key = f"{mode}/{backend}"
            before = snapshot(model) if mode == "value" else None
            given = copy.deepcopy(config)  # audit_config gets its own copy: the sweep's config stays pristine
            config_before = given.to_json_string(use_diff=False)
            try:
                if mode == "value":
                    report = timed(key, lambda: audit_loaded(loaded, settings=Settings().layered({"backend": backend})))
                else:
                    report = timed(key, lambda: dtypelint.audit_config(given, dtype="float16", backend=backend,
                                                                      model_class=class_name, seq_len=8))
                if report.model != class_name:
                    row["substituted"].append(f"{key}: {report.model}")
                if mode == "value" and (difference := first_difference(dispatched, recorded_ops(report.graph))):
                    row["ops_differ"][key] = difference
                row["audits"][key] = summarize(report)
                del report
            except Exception as error:  # noqa: BLE001 - an internal error of dtypelint
                row["audits"][key] = {"internal": _short(error)}
                row["internal"].append({"mode": mode, "backend": backend, "type": type(error).__name__,
                                        "message": _short(error, 400), **_frames(error)})
            changed = changes(model, before) if before is not None else global_hooks_left()
            if mode == "meta" and given.to_json_string(use_diff=False) != config_before:
                after, before_dict = json.loads(given.to_json_string(use_diff=False)), json.loads(config_before)
                row.setdefault("config_mutated", {})[key] = sorted(
                    k for k in set(after) | set(before_dict) if after.get(k) != before_dict.get(k))
            if changed:
                row["changed"][key] = changed
    shutil.rmtree(checkpoint, ignore_errors=True)
    rec.stage("done")


def child(unit: dict[str, str], out: Path, log: Path) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)
    rec = Recorder(out, unit["key"])
    try:
        check_architecture(unit, rec)
    except BaseException as error:  # noqa: BLE001 - the sweep itself must report, not die
        rec.row["sweep_error"] = _short(error)
        traceback.print_exc()
    rec.flush()


# --------------------------------------------------------------------------------------------- parent
def run_all(units: list[dict[str, str]], jobs: int, timeout: float, workdir: Path,
            resume: bool = False) -> list[dict[str, Any]]:
    pending = list(units)
    running: dict[int, tuple[str, float, Path]] = {}
    rows: dict[str, dict[str, Any]] = {}
    while pending or running:
        while pending and len(running) < jobs:
            unit = pending.pop(0)
            model_type = unit["key"]
            out, log = workdir / f"{model_type}.json", workdir / f"{model_type}.log"
            if resume and out.exists():
                row = json.loads(out.read_text())
                if row.get("stage") in ("done", "skipped") and not row.get("sweep_error"):
                    rows[model_type] = {**row, "wall": row.get("elapsed"), "resumed": True}
                    continue
            sys.stdout.flush()
            sys.stderr.flush()
            scratch = workdir / f"{model_type}.scratch"
            scratch.mkdir(exist_ok=True)
            pid = os.fork()
            if pid == 0:
                try:
                    tempfile.tempdir = str(scratch)  # the parent removes it, also after a kill or a crash
                    child(unit, out, log)
                finally:
                    os._exit(0)
            running[pid] = (model_type, time.perf_counter(), out)
        time.sleep(0.05)
        for pid, (model_type, start, out) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            elapsed = time.perf_counter() - start
            if not done and elapsed < timeout:
                continue
            if not done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            row = json.loads(out.read_text()) if out.exists() else {"arch": model_type, "stage": "start",
                                                                     **next(u for u in units if u["key"] == model_type)}
            if not done:
                row["timeout"] = f"killed after {timeout:.0f} s in stage {row.get('stage')}"
            elif os.WIFSIGNALED(status):
                row["crash"] = f"signal {os.WTERMSIG(status)} in stage {row.get('stage')}"
            elif row.get("stage") not in ("done", "skipped"):
                row["crash"] = f"exited in stage {row.get('stage')}"
            row["wall"] = round(elapsed, 1)
            rows[model_type] = row
            del running[pid]
            shutil.rmtree(workdir / f"{model_type}.scratch", ignore_errors=True)
            status_text = row.get("skip") or row.get("timeout") or row.get("crash") or "audited"
            print(f"[{len(rows):3d}/{len(units)}] {model_type:<44} {elapsed:5.1f}s  {status_text[:110]}", flush=True)
    return [rows[unit["key"]] for unit in units]


def classify(row: dict[str, Any], mode: str) -> str:
    """ok / limit (DT002) / DT001 / INTERNAL / timeout / crash for the two audits of ``mode``."""
    audits = [row.get("audits", {}).get(f"{mode}/{b}") for b in BACKENDS]
    if any(a and "internal" in a for a in audits):
        return "INTERNAL"
    if any(a is None for a in audits):
        return "timeout" if row.get("timeout") else "crash" if row.get("crash") or row.get("sweep_error") else "-"
    if any(a["DT002"] for a in audits):
        return "limit"
    if any(a["DT001"] for a in audits):
        return "DT001"
    return "ok"


def layout_violations(row: dict[str, Any]) -> list[str]:
    found = []
    for mode in MODES:
        ipex = row.get("audits", {}).get(f"{mode}/ipex-llm-xpu")
        if ipex and "internal" not in ipex and not ipex["DT001"] and not ipex["DT002"]:
            got = bool(ipex["ipx101_errors"])
            if got != row["ipx101_expected"]:
                found.append(f"{mode}: IPX101 expected={row['ipx101_expected']} found={got}"
                             + (f" ({ipex['ipx101_errors'][0]})" if got else ""))
            if row["layout"] == "model-level" and got:
                found.append(f"{mode}: IPX101 on a model-level rotary layout")
        hf = row.get("audits", {}).get(f"{mode}/hf-eager")
        if hf and "internal" not in hf and hf["inv_freq_errors"]:
            found.append(f"{mode}: hf-eager error mentions inv_freq: {hf['inv_freq_errors'][0]}")
    return found


def cuda_errors(row: dict[str, Any]) -> list[str]:
    """cuda-pack errors on a model whose plain float16 forward ran with its default (sdpa) attention: each
    is a false error unless the model really holds what CUDA rejects (to be read, not assumed)."""
    return [f"{mode}: {error}" for mode in MODES
            for error in (row.get("audits", {}).get(f"{mode}/cuda") or {}).get("cuda_errors", [])]


FAMILY_COLUMNS = ["family", "swept", "denominator", "value: no internal error", "meta: no internal error",
                  "meta complete / DT002 / DT001", "changed model", "another class", "value errors (hf-eager)"]


def family_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per task family: the README's table."""
    table = []
    for family in dict.fromkeys(row["family"] for row in rows):
        mine = [row for row in rows if row["family"] == family]
        kept = [row for row in mine if row.get("builds")]
        table.append([
            family, len(mine), len(kept),
            sum(row["value"] in ("ok", "limit", "DT001") for row in kept),
            sum(row["meta"] in ("ok", "limit", "DT001") for row in kept),
            " / ".join(str(sum(row["meta"] == kind for row in kept)) for kind in ("ok", "limit", "DT001")),
            sum(bool(row.get("changed")) for row in kept),
            sum(bool(row.get("substituted")) for row in kept),
            sum(bool((row.get("audits", {}).get("value/hf-eager") or {}).get("errors")) for row in kept),
        ])
    return table


def compact(counts: dict[str, int]) -> str:
    return " ".join(f"{ABBREV.get(k, k)}:{v}" for k, v in sorted(counts.items())) or "-"


def sweep_units(tasks: set[str] | None = None, families: set[str] | None = None, only: set[str] | None = None,
                sample: int | None = None) -> tuple[list[dict[str, str]], Counter]:
    """The (model_type, class) pairs to sweep, each under the first task mapping that lists it, filtered by
    task, family or model_type; with ``sample``, at most that many per task, spread evenly over the mapping.
    A class that transformers builds for several model types (``LlamaForCausalLM`` for ``llama`` and
    ``exaone``) is swept for each, keyed ``CLASS@model_type`` but for its own model type. Also the number of units per
    family before sampling."""
    from dtypelint.model_class import task_family, task_mappings

    seen: set[tuple[str, str]] = set()
    units: list[dict[str, str]] = []
    per_family: Counter = Counter()
    for task, mapping in task_mappings().items():
        family = task_family(task)
        own = _own_model_types(mapping)
        candidates = []
        for model_type, name in mapping.items():
            name = name[0] if isinstance(name, (list, tuple)) and name else name
            if not isinstance(name, str) or (model_type, name) in seen:
                continue
            seen.add((model_type, name))
            key = name if own[name] == model_type else f"{name}@{model_type}"
            if (tasks and task.lower() not in tasks) or (families and family not in families) \
                    or (only and model_type not in only):
                continue
            per_family[family] += 1
            candidates.append({"class": name, "key": key, "model_type": model_type, "task": task or "BASE",
                               "family": family})
        if sample and len(candidates) > sample:
            candidates = [candidates[index * len(candidates) // sample] for index in range(sample)]
        units += candidates
    return units, per_family


def _own_model_types(mapping: dict[str, Any]) -> dict[str, str]:
    """Each class of a task mapping -> its own model type: one whose config class is named as the class is
    (``LlamaConfig``, ``LlamaForCausalLM``), the one that also bears the model type's name first (``gpt2``
    before ``gpt-sw3``, both ``GPT2Config``), else the first that maps to it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    def rank(model_type: str, name: str) -> int:
        stem = CONFIG_MAPPING_NAMES.get(model_type, "").removesuffix("Config")
        if not stem or not name.startswith(stem):
            return 2
        return 0 if stem.lower() == model_type.replace("-", "").replace("_", "") else 1

    own: dict[str, tuple[int, str]] = {}
    for model_type, name in mapping.items():
        name = name[0] if isinstance(name, (list, tuple)) and name else name
        if isinstance(name, str) and (name not in own or rank(model_type, name) < own[name][0]):
            own[name] = (rank(model_type, name), model_type)
    return {name: model_type for name, (_, model_type) in own.items()}


def _names(text: str | None) -> set[str] | None:
    return {part.strip().lower() if part.strip().isupper() else part.strip() for part in text.split(",")
            if part.strip()} if text else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", help="comma-separated task mappings (causal_lm, seq_to_seq_causal_lm, masked_lm, "
                                       "image_classification, ...: MODEL_FOR_<TASK>_MAPPING_NAMES; base for the bare model)")
    parser.add_argument("--family", help="comma-separated task families (dtypelint.model_class.TASK_FAMILIES values)")
    parser.add_argument("--sample", type=int, help="at most this many classes per task, spread over the mapping")
    parser.add_argument("--only", help="comma-separated model_types")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per architecture (all stages)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--workdir", type=Path, help="keep per-architecture results and logs here")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished per-architecture results already in --workdir")
    parser.add_argument("--compare", type=Path, help="a --json of an earlier sweep: list every audit whose "
                                                     "findings differ (exit 1 if any)")
    args = parser.parse_args()

    started = time.perf_counter()
    import torch  # noqa: F401 - imported once, before forking
    import transformers
    from tabulate import tabulate

    import dtypelint  # noqa: F401
    import dtypelint.packs.schema  # noqa: F401 - imported before the children fork, so they share it

    sys.path.insert(0, str(TESTS))

    tasks = {task.lower().replace("base", "") for task in _names(args.task) or ()} or None
    units, per_family = sweep_units(tasks, _names(args.family), _names(args.only), args.sample)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}: "
          f"{len(units)} classes ({', '.join(f'{family} {count}' for family, count in per_family.items())} before "
          f"sampling), {args.jobs} jobs, {args.timeout:.0f} s each", flush=True)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="arch-sweep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = run_all(units, args.jobs, args.timeout, workdir, args.resume)
    for row in rows:
        row["value"] = classify(row, "value") if row.get("builds") else ""
        row["meta"] = classify(row, "meta") if row.get("builds") else ""
        row["violations"] = layout_violations(row) if row.get("builds") else []

    kept = [r for r in rows if r.get("builds")]
    skipped = [r for r in rows if not r.get("builds")]
    print(f"\nSkipped ({len(skipped)}): plain transformers fails to build/save/reload/run")
    for row in skipped:
        reason = row.get("skip") or row.get("timeout") or row.get("crash") or row.get("sweep_error") or "?"
        print(f"  {row['arch']:<28} {reason[:150]}")
    print(f"\nDenominator ({len(kept)}): {', '.join(r['arch'] for r in kept)}\n")

    table = []
    for row in kept:
        value = row.get("audits", {}).get("value/hf-eager") or {}
        ipex = row.get("audits", {}).get("value/ipex-llm-xpu") or {}
        kc = {k: v for k, v in (ipex.get("codes") or {}).items() if k.startswith("IPX")}
        found = {m: bool((row.get("audits", {}).get(f"{m}/ipex-llm-xpu") or {}).get("ipx101_errors")) for m in MODES}
        table.append([
            row["arch"], row["family"], row["value"], row["meta"],
            row["layout"] + ("" if row["layout"] == "none" else f" ({'/'.join(row['inv_freq'])})"),
            f"{'Y' if row['ipx101_expected'] else 'n'}/{'Y' if found['value'] else 'n'}{'Y' if found['meta'] else 'n'}",
            compact(value.get("categories") or {}), compact(kc),
            "CHANGED" if row.get("changed") else "", len(row["violations"]) or "",
        ])
    print(tabulate(table, headers=["class", "family", "value", "meta", "layout (inv_freq)",
                                   "IPX101 exp/found(v,m)", "findings value/hf-eager", "ipex codes (value)",
                                   "model", "viol."]))

    internal = [(r["arch"], e) for r in kept for e in r.get("internal", [])]
    if internal:
        print(f"\nInternal errors ({len(internal)}):")
        groups: dict[tuple[str, str], list[str]] = {}
        for arch, error in internal:
            groups.setdefault((error["type"], error["dtypelint_frame"]), []).append(f"{arch} {error['mode']}/{error['backend']}")
        for (kind, frame), where in groups.items():
            example = next(e for a, e in internal if (e["type"], e["dtypelint_frame"]) == (kind, frame))
            print(f"  {kind} at {frame} (innermost {example['innermost_frame']}): {len(where)}x")
            print(f"    {example['message'][:300]}")
            print(f"    {', '.join(where)}")
    for mode, heading in (("value", "Value audits with DT001 although the plain forward ran"),
                          ("meta", "Meta audits with DT001")):
        failed = [(r["arch"], k, a["error"]) for r in kept for k, a in r.get("audits", {}).items()
                  if a.get("DT001") and k.startswith(mode)]
        if failed:
            print(f"\n{heading} ({len(failed)}):")
            for arch, key, error in failed:
                print(f"  {arch} {key}: {(error or '')[:200]}")
    changed = [(r["arch"], k, v) for r in kept for k, v in (r.get("changed") or {}).items()]
    if changed:
        print(f"\nAudits that changed the model ({len(changed)}):")
        for arch, key, what in changed:
            print(f"  {arch} {key}: {', '.join(what)}")
    mutated = [(r["arch"], k, v) for r in kept for k, v in (r.get("config_mutated") or {}).items()]
    if mutated:
        fields = Counter(f for _, _, v in mutated for f in v)
        print(f"\naudit_config calls that mutated the caller's config ({len(mutated)}): fields {dict(fields)}; "
              f"architectures: {', '.join(sorted({a for a, _, _ in mutated}))}")
    violations = [(r["arch"], v) for r in kept for v in r["violations"]]
    if violations:
        print(f"\nLayout expectation violations ({len(violations)}):")
        for arch, text in violations:
            print(f"  {arch}: {text[:250]}")
    flagged = [(r["arch"], e) for r in kept for e in cuda_errors(r)]
    if flagged:
        print(f"\ncuda errors on models that ran in float16 with sdpa ({len(flagged)}):")
        for arch, text in flagged:
            print(f"  {arch}: {text[:250]}")
    ops_differ = [(r["arch"], k, v) for r in kept for k, v in (r.get("ops_differ") or {}).items()]
    if ops_differ:
        print(f"\nValue audits whose recorded ops differ from a bare dispatch mode's ({len(ops_differ)}):")
        for arch, key, text in ops_differ:
            print(f"  {arch} {key}: {text[:250]}")
    substituted = [(r["arch"], text) for r in kept for text in r.get("substituted", [])]
    if substituted:
        print(f"\nAudits of another class than the checkpoint's ({len(substituted)}):")
        for arch, text in substituted:
            print(f"  {arch}: {text}")
    value_errors = [(r["arch"], e) for r in kept for e in (r.get("audits", {}).get("value/hf-eager") or {}).get("errors", [])]
    if value_errors:
        print(f"\nErrors of value audits under hf-eager, whose plain float16 forward ran ({len(value_errors)}; to be read):")
        for arch, text in value_errors:
            print(f"  {arch}: {text[:250]}")
    incomplete = [r["arch"] for r in kept if r.get("timeout") or r.get("crash") or r.get("sweep_error")]
    print("\nPer task family:")
    print(tabulate(family_rows(rows), headers=FAMILY_COLUMNS))

    def no_internal(mode: str) -> int:
        return sum(1 for r in kept if r[mode] in ("ok", "limit", "DT001"))

    totals = {
        "transformers": transformers.__version__,
        "classes_swept": len(units),
        "denominator": len(kept),
        "value_without_internal_error": no_internal("value"),
        "meta_without_internal_error": no_internal("meta"),
        "value_ok": sum(r["value"] == "ok" for r in kept),
        "meta_ok": sum(r["meta"] == "ok" for r in kept),
        "meta_limit_DT002": sum(r["meta"] == "limit" for r in kept),
        "value_DT001": sum(r["value"] == "DT001" for r in kept),
        "meta_DT001": sum(r["meta"] == "DT001" for r in kept),
        "internal_errors": len(internal),
        "audits_changed_model": len(changed),
        "audit_config_mutated_config": len(mutated),
        "layout_violations": len(violations),
        "audits_of_another_class": len(substituted),
        "value_ops_compared": sum("ops_differ" in r for r in kept),
        "value_ops_differ": sorted({a for a, _, _ in ops_differ}),
        "architectures_with_value_errors_hf_eager": sorted({a for a, _ in value_errors}),
        "cuda_error_architectures": sorted(r["arch"] for r in kept if cuda_errors(r)),
        "per_layer": sum(r["layout"] == "per-layer" for r in kept),
        "model_level": sum(r["layout"] == "model-level" for r in kept),
        "audits_incomplete": incomplete,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    print("\nTotals:")
    print(tabulate([[k, v] for k, v in totals.items()]))
    print(f"(per-architecture results and child logs: {workdir})")
    if args.json:
        args.json.write_text(json.dumps({"totals": totals, "rows": rows}, indent=1, default=str))
    return compare(rows, json.loads(args.compare.read_text())["rows"]) if args.compare else 0


def compare(rows: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> int:
    """Print each audit (class, mode/backend) whose findings differ from the earlier sweep's; 1 if any."""
    def findings(sweep: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
        return {(row["arch"], key): audit.get("findings", audit.get("internal"))
                for row in sweep for key, audit in (row.get("audits") or {}).items() if audit}

    now, before = findings(rows), findings(earlier)
    differing = sorted(key for key in now.keys() | before.keys() if now.get(key) != before.get(key))
    for arch, audit in differing:
        old, new = ([value] if isinstance(value, str) else value or []
                    for value in (before.get((arch, audit)), now.get((arch, audit))))
        print(f"{arch} {audit}: only before {sorted(set(old) - set(new))[:3]}, only now {sorted(set(new) - set(old))[:3]}")
    print(f"compared {len(now.keys() & before.keys())} audits with the earlier sweep: {len(differing)} differ")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
