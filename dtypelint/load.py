"""Stage 1 of the pipeline: get a model and sample inputs the way users load them.

A checkpoint directory loads with ``from_pretrained(path, dtype=...)``; a config alone builds the model
inside ``FakeTensorMode`` (meta mode: shapes and dtypes, no weight memory); sample inputs are synthesized
from the config. Nothing is downloaded: every load is local.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dtypelint.dtypes import parse_dtype
from dtypelint.errors import LoadError, UsageError, first_line


def transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def dtype_keyword() -> str:
    """``from_pretrained``/``from_config`` take ``dtype=`` since transformers 4.56, ``torch_dtype=`` before."""
    return "dtype" if transformers_version() >= (4, 56) else "torch_dtype"


def load_config(config: Any, *, trust_remote_code: bool = False) -> Any:
    """A transformers config from a config object, a ``config.json`` path or a directory holding one."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    path = Path(config)
    if not path.exists():
        raise LoadError(f"{path} does not exist")
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise LoadError(f"{path} has no config.json")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoadError(f"{file}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise LoadError(f"{file}: expected a JSON object")
    if "auto_map" in data and not trust_remote_code:
        raise UsageError(f"{file} needs remote code (auto_map); pass trust_remote_code=True / --trust-remote-code")
    model_type = data.get("model_type")
    try:
        if path.is_dir():
            return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        return AutoConfig.for_model(model_type, **{k: v for k, v in data.items() if k != "model_type"})
    except (KeyError, ValueError) as error:
        if model_type is None:
            raise LoadError(f"{file} has no model_type") from None
        raise LoadError(f"{file}: cannot build a config for model_type {model_type!r}: {first_line(error)}") from None


def config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a config declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return parse_dtype(declared) if isinstance(declared, (str, torch.dtype)) else None


def build_meta_model(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """Build a causal LM from a copy of ``config`` on the meta device, weight initialisation skipped:
    no memory, no values to initialise (some initialisers are data-dependent), and the caller's config
    untouched. Meta mode runs its forward on fake CPU stand-ins of these tensors."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"), _no_init_weights():
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), **{dtype_keyword(): dtype})
    except ValueError as error:
        raise LoadError(f"cannot build a causal LM for model_type {config.model_type!r}: {first_line(error)}") from None
    return model.eval()


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    return no_init_weights()


def sample_inputs(
    model: torch.nn.Module, config: Any, *, batch: int = 1, seq_len: int = 16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and, where the forward takes them, ``position_ids``.

    Call it inside the fake mode for a fake model, so the inputs are fake too.
    """
    if batch < 1 or seq_len < 1:
        raise UsageError("batch and seq_len must be at least 1")
    vocab = getattr(config, "vocab_size", None) or 2
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
    if "position_ids" in inspect.signature(model.forward).parameters:
        inputs["position_ids"] = torch.arange(seq_len).unsqueeze(0).expand(batch, -1)
    return inputs


def call_arguments(model: torch.nn.Module, inputs: Any) -> tuple[tuple, dict[str, Any], list[str]]:
    """Positional args, keyword args and the forward's positional parameter names for ``inputs``:
    a tensor, a tuple/list of positional args, or a mapping of keyword args."""
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    elif isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
        if not all(isinstance(key, str) for key in kwargs):
            raise UsageError("keyword inputs need string keys")
    else:
        raise UsageError(
            f"inputs must be a tensor, a tuple of positional arguments or a dict of keyword arguments, "
            f"not {type(inputs).__name__}"
        )
    try:
        parameters = inspect.signature(model.forward).parameters.values()
        names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    return args, kwargs, names


IPEX_INSTALL = (
    "pip install torch==2.13.0 && pip install --no-deps ipex-llm==2.2.0 && pip install transformers==4.37.0 "
    "tokenizers==0.15.2 accelerate==0.23.0 numpy sentencepiece py-cpuinfo protobuf (in its own virtual environment)"
)


def is_low_bit(path: str | Path) -> bool:
    """True for a directory that ipex-llm's ``save_low_bit`` wrote."""
    file = Path(path) / "config.json"
    try:
        return "bigdl_transformers_low_bit" in json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load_checkpoint(path: str | Path, dtype: torch.dtype | None, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """Load a checkpoint directory as users do: ``from_pretrained(path, dtype=dtype)``, or ipex-llm's
    ``load_low_bit(path, torch_dtype=dtype)`` for a directory that ``save_low_bit`` wrote."""
    config = load_config(path, trust_remote_code=trust_remote_code)
    if is_low_bit(path):
        try:
            from ipex_llm.transformers import AutoModelForCausalLM
        except ImportError:
            raise UsageError(f"{path} is an ipex-llm low-bit checkpoint; install the ipex extra: {IPEX_INSTALL}") from None
        load = AutoModelForCausalLM.load_low_bit
        arguments: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if dtype is not None:
            arguments["torch_dtype"] = dtype
        path = str(path)
    else:
        from transformers import AutoModelForCausalLM

        load = AutoModelForCausalLM.from_pretrained
        arguments = {dtype_keyword(): dtype or "auto", "config": config, "local_files_only": True,
                     "trust_remote_code": trust_remote_code}
    try:
        model = load(path, **arguments)
    except Exception as error:  # noqa: BLE001 - loaders raise many types (SafetensorError, OSError, ...)
        raise LoadError(f"cannot load {path}: {first_line(error)}") from None
    return model.eval()



def load_entry(spec: str) -> tuple[torch.nn.Module, Any]:
    """``module.path:function`` returning ``(model, inputs)``: the way in for custom models."""
    import importlib

    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise UsageError(f"--entry {spec!r} must look like module.path:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except ImportError as error:
        raise LoadError(f"--entry {spec!r}: cannot import {module_name}: {error}") from None
    except AttributeError:
        raise LoadError(f"--entry {spec!r}: {module_name} has no {function_name}") from None
    result = function()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise UsageError(f"--entry {spec!r} must return (model, inputs), got {type(result).__name__}")
    return result


SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}


def stored_dtypes(path: str | Path) -> dict[str, str]:
    """Tensor name -> stored dtype, read from the safetensors headers alone (no tensor data is read)."""
    import struct

    directory = Path(path)
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise LoadError(f"{directory} holds no *.safetensors files to read headers from")
    dtypes: dict[str, str] = {}
    for shard in shards:
        with shard.open("rb") as file:
            prefix = file.read(8)
            size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if size <= 0 or size > shard.stat().st_size - 8:
                raise LoadError(f"{shard}: truncated or not a safetensors file")
            try:
                header = json.loads(file.read(size))
                end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                          default=0)
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
                raise LoadError(f"{shard}: corrupt safetensors header") from None
        if 8 + size + end > shard.stat().st_size:
            raise LoadError(f"{shard}: truncated: the header describes {end} bytes of data, the file is shorter")
        for name, entry in header.items():
            if name != "__metadata__":
                dtypes[name] = SAFETENSORS_DTYPES.get(entry.get("dtype", "?"), entry.get("dtype", "?"))
    return dtypes
