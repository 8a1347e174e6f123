"""Every diffusers model class, audited in float16 with the inputs ``dtypelint.diffusion.component_inputs``
makes for it: in meta mode from its default config (full size, on the meta device), and in value mode from a
tiny config (its default shrunk: one layer per stack, two heads, 32 channels, 32-wide conditioning). What
happened to each: which build, which get inputs, which trace to the end, whether value and meta mode agree
on the tiny config, and the internal errors and changed models (weights, buffers, dtypes, config: all 0).

Each class runs in its own process with a timeout.

    python benchmarks/diffusers_sweep.py [--jobs 2] [--timeout 120] [--json FILE] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def model_classes() -> list[str]:
    import diffusers
    from diffusers.models.modeling_utils import ModelMixin

    names = []
    for name in dir(diffusers):
        try:
            value = getattr(diffusers, name)
        except Exception:  # noqa: BLE001 - an optional dependency diffusers lacks here
            continue
        if isinstance(value, type) and issubclass(value, ModelMixin) and value is not ModelMixin:
            names.append(name)
    return sorted(names)


#: Config keys shrunk for the value sweep, and how: stacks to one layer, heads to two, widths to 32.
ONE_LAYER = ("num_layers", "num_single_layers", "layers_per_block", "transformer_layers_per_block",
             "num_refiner_layers", "num_noise_refiner_layers", "num_context_refiner_layers", "depth")
NARROW = ("cross_attention_dim", "joint_attention_dim", "pooled_projection_dim", "caption_channels",
          "text_embed_dim", "encoder_hid_dim", "text_dim", "context_dim")
TINY_PARAMETERS = 400_000_000  # what this 2-core machine builds and runs in seconds


def tiny_config(model_class: type) -> dict:
    """The class's default config shrunk; a key keeps its default where shrinking does not apply, and a width
    that equals the attention's inner width (heads x head width) follows it."""
    import inspect

    defaults = {key: parameter.default for key, parameter in inspect.signature(model_class.__init__).parameters.items()
                if parameter.default is not inspect.Parameter.empty and not isinstance(parameter.default, bool)}
    heads, head_width = defaults.get("num_attention_heads"), defaults.get("attention_head_dim")
    inner = heads * head_width if isinstance(heads, int) and isinstance(head_width, int) and heads > 2 else None
    shrunk: dict = {}
    for key, value in defaults.items():
        if inner is not None and value == inner and isinstance(value, int):
            shrunk[key] = 2 * head_width
        elif key in ONE_LAYER and isinstance(value, int) and value > 1:
            shrunk[key] = 1
        elif key in ONE_LAYER and isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
            shrunk[key] = type(value)(min(v, 1) for v in value)
        elif key == "num_attention_heads" and isinstance(value, int) and value > 2:
            shrunk[key] = 2
        elif key == "num_attention_heads" and isinstance(value, (tuple, list)):
            shrunk[key] = type(value)(2 for _ in value)
        elif key == "block_out_channels" and isinstance(value, (tuple, list)):
            shrunk[key] = type(value)(32 for _ in value)
        elif key in NARROW and isinstance(value, int) and value > 32:
            shrunk[key] = 32
        elif key == "sample_size" and isinstance(value, int) and value > 32:
            shrunk[key] = 32
    if "block_out_channels" in shrunk and isinstance(head_width, int) and head_width > 8:
        shrunk["attention_head_dim"] = 8  # a UNet's heads split its 32 channels
    return shrunk


def _fingerprint(model) -> str:
    """Everything an audit must leave alone: each tensor's name, dtype, device, values; the config."""
    import hashlib

    import torch

    digest = hashlib.sha256(json.dumps(dict(model.config), sort_keys=True, default=str).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name} {tensor.dtype} {tensor.device}".encode())
        if tensor.device.type != "meta":
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _audited(model, mode: str) -> dict:
    """A meta or value audit of ``model`` in float16: its findings, or the stage where it stopped."""
    import torch

    import dtypelint
    from dtypelint.diffusion import component_inputs
    from dtypelint.errors import DtypelintError
    from dtypelint.fake import new_fake_mode

    before = _fingerprint(model)
    try:
        if mode == "meta":
            with new_fake_mode():
                inputs = component_inputs(model, batch=1, dtype=torch.float16)
        else:
            inputs = component_inputs(model, batch=1, dtype=torch.float16)
    except DtypelintError as error:
        return {"stage": "inputs", "why": str(error)[:200]}
    try:
        report = dtypelint.audit(model, inputs, mode=mode, dtype="float16")
    except DtypelintError as error:
        return {"stage": "usage", "why": str(error)[:200]}
    except Exception as error:  # noqa: BLE001 - an internal error of dtypelint: what the sweep counts
        return {"stage": "internal", "why": f"{type(error).__name__}: {error}"[:300]}
    return {"stage": "audited", "changed": _fingerprint(model) != before,
            "complete": not report.by_code("DT002") and not report.by_code("DT001"),
            "findings": sorted(f"{finding.code} {finding.severity} {finding.location}"
                               for finding in report.findings)}


def _built(name: str, config: dict, device: str):
    import diffusers
    import torch

    with torch.device(device):
        return getattr(diffusers, name)(**config).to(torch.float16).eval()


def _build_failed(error: Exception) -> dict:
    first = str(error).splitlines()[0][:160] if str(error) else ""
    return {"stage": "build", "why": f"{type(error).__name__}: {first}"}


def audit_one(name: str) -> dict:
    """One class: a meta audit from the default config; value and meta audits from the tiny one."""
    import diffusers

    row: dict = {"class": name}
    try:
        row["meta"] = _audited(_built(name, {}, "meta"), "meta")
    except Exception as error:  # noqa: BLE001 - a class whose config does not build is not ours to judge
        row["meta"] = _build_failed(error)
    config = tiny_config(getattr(diffusers, name))
    try:
        parameters = sum(parameter.numel() for parameter in _built(name, config, "meta").parameters())
        if parameters > TINY_PARAMETERS:
            row["value"] = {"stage": "too big", "why": f"{parameters / 1e6:.0f}M parameters"}
            return row
        model = _built(name, config, "cpu")
    except Exception as error:  # noqa: BLE001 - as above
        row["value"] = _build_failed(error)
        return row
    row["value"] = _audited(model, "value")
    row["tiny_meta"] = _audited(model, "meta")
    if row["value"]["stage"] == row["tiny_meta"]["stage"] == "audited":
        row["modes_agree"] = row["value"]["findings"] == row["tiny_meta"]["findings"]
    return row


FAMILIES = (("ControlNets and adapters", ("ControlNet", "Adapter")),
            ("autoencoders and vocoders", ("Autoencoder", "VAE", "VQModel", "Vocoder", "Tokenizer", "Decoder")),
            ("UNets", ("UNet",)), ("video transformers", ("3D", "Video")),
            ("image and audio transformers", ("Transformer", "DiT", "Model")))


def family(name: str) -> str:
    return next((label for label, marks in FAMILIES if any(mark in name for mark in marks)), "other")


def family_table(rows: list[dict]) -> str:
    """A markdown row per family: classes; meta mode audited / traced to the end; value mode likewise; the
    classes whose value and meta findings agree on the tiny config."""
    lines = ["| family | classes | meta: audited / complete | tiny value: audited / complete | modes agree |",
             "|---|---|---|---|---|"]
    labels = [label for label, _ in FAMILIES] + ["other"]
    for label in labels:
        members = [row for row in rows if family(row["class"]) == label]
        if not members:
            continue

        def counted(mode: str, members: list[dict] = members) -> str:
            results = [row.get(mode) or {} for row in members]
            return (f"{sum(result.get('stage') == 'audited' for result in results)} / "
                    f"{sum(bool(result.get('complete')) for result in results)}")
        agree = sum(row.get("modes_agree") is True for row in members)
        lines.append(f"| {label} | {len(members)} | {counted('meta')} | {counted('value')} | {agree} |")
    return "\n".join(lines)


def run(name: str, timeout: float) -> dict:
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"class": name, "stage": "crashed", "why": done.stderr[-300:]}
    except subprocess.TimeoutExpired:
        row = {"class": name, "stage": "timeout"}
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated class names")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    if options.one:
        print(json.dumps(audit_one(options.one)))
        return 0
    names = options.only.split(",") if options.only else model_classes()
    with ThreadPoolExecutor(options.jobs) as pool:
        rows = list(pool.map(lambda name: run(name, options.timeout), names))
    for row in rows:
        for mode in ("meta", "value"):
            result = row.get(mode) or {"stage": row.get("stage", "-"), "why": row.get("why", "")}
            detail = result.get("why") or ", ".join(f for f in result.get("findings", []) if " info " not in f)
            print(f"{row['class']:<44} {mode:<5} {result['stage']:<9} {row['seconds']:>6}s  {detail[:140]}")
    totals: dict = {"classes": len(rows)}
    for mode in ("meta", "value", "tiny_meta"):
        results = [row.get(mode) or {"stage": row.get("stage", "-")} for row in rows]
        totals[mode] = {**Counter(result["stage"] for result in results),
                        "complete": sum(bool(result.get("complete")) for result in results),
                        "changed": sum(bool(result.get("changed")) for result in results)}
    totals["internal_errors"] = sum(row.get("stage") == "crashed" or any(
        (row.get(mode) or {}).get("stage") == "internal" for mode in ("meta", "value", "tiny_meta")) for row in rows)
    totals["timeouts"] = [row["class"] for row in rows if row.get("stage") == "timeout"]
    totals["modes_agree"] = sum(row.get("modes_agree") is True for row in rows)
    totals["modes_differ"] = [row["class"] for row in rows if row.get("modes_agree") is False]
    print(json.dumps(totals))
    print(family_table(rows))
    if options.json:
        options.json.write_text(json.dumps({"totals": totals, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
