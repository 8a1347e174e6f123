"""Stage 1 of the pipeline: get a model and sample inputs the way users load them.

One function, ``load(Request)``, turns what the user names into a model and sample inputs; each way in is
one registered loader: an ``--entry`` function, an ipex-llm ``save_low_bit`` directory (``load_low_bit``),
a checkpoint directory (``from_pretrained(path, dtype=...)``), and a config alone (meta mode: the model is
built on the meta device, its inputs are fake tensors; shapes and dtypes, no memory). Sample inputs are
synthesized from the config. Nothing is downloaded: every load is local.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtypelint.diffusion import PIPELINE_FILE, is_pipeline
from dtypelint.dtypes import parse_dtype
from dtypelint.errors import LoadError, UsageError, first_line
from dtypelint.inputs import (
    MAX_INPUT_ELEMENTS,
    PREPROCESSOR_FILE,
    InputBound,
    SynthesizedInput,
    describe_inputs,
    synthesize_inputs,
)
from dtypelint.model_class import ModelClass, resolve_model_class
from dtypelint.paths import (
    check_regular_file,
    local_path,
    open_regular,
    parse_file,
    reason,
    refuse_weights_file,
    shown,
)


def transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def dtype_keyword() -> str:
    """``from_pretrained``/``from_config`` take ``dtype=`` since transformers 4.56, ``torch_dtype=`` before."""
    return "dtype" if transformers_version() >= (4, 56) else "torch_dtype"


# Meta mode builds and traces every layer (about 15 ms each): a config may ask for at most this many in a
# stack. Released models have a few hundred at most (Llama 3.1 405B: 126).
MAX_LAYERS = 1024

# Modules a layer may build on average, within MAX_LAYERS: a Llama layer builds about 12, a DeepSeek-V3
# layer of 256 experts about 1000 (63k modules in its 61 layers). Building costs about 0.1 ms a module, so
# an expert count no model has (a million) is refused while it builds, within seconds.
MODULES_PER_LAYER = 256

# Config fields whose value sizes the model: a value that is not a positive integer cannot build one.
_SIZE_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                "num_key_value_heads", "max_position_embeddings", "head_dim")


def check_config_sizes(data: Mapping[str, Any], file: Path) -> None:
    """Refuse sizes no model can have (``hidden_size: -64``, ``num_attention_heads: 0``, a string) as a
    config error, before transformers fails on them with a traceback deep inside a layer. A size takes the
    shape its config class's default has (per-stage head counts are a list in SegFormer), and the head
    counts must divide where the class's defaults divide (families with their own head size need not)."""
    defaults = _default_fields(data.get("model_type"))
    for key in _SIZE_FIELDS:
        value = data.get(key)
        if value is not None and value != defaults.get(key) and not _positive_sizes(value, defaults.get(key)):
            raise LoadError(f"{file}: {key!r} must be a positive integer, not {value!r}")
    hidden, heads = data.get("hidden_size"), data.get("num_attention_heads")
    if data.get("head_dim") is None and _must_divide(hidden, heads, defaults, "hidden_size", "num_attention_heads"):
        raise LoadError(f"{file}: 'hidden_size' {hidden} is not divisible by 'num_attention_heads' {heads} "
                        f"(and no 'head_dim' is given)")
    key_value_heads = data.get("num_key_value_heads")
    if _must_divide(heads, key_value_heads, defaults, "num_attention_heads", "num_key_value_heads"):
        raise LoadError(f"{file}: 'num_attention_heads' {heads} is not divisible by 'num_key_value_heads' "
                        f"{key_value_heads}")


def _positive_sizes(value: Any, default: Any) -> bool:
    """A positive integer; or, where the default is a list or a table of them, a list or table of them."""
    if isinstance(default, (list, tuple)) and isinstance(value, list):
        return bool(value) and all(_positive_sizes(item, None) for item in value)
    if isinstance(default, dict) and isinstance(value, dict):
        return bool(value) and all(_positive_sizes(item, None) for item in value.values())
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _must_divide(total: Any, parts: Any, defaults: Mapping[str, Any], total_key: str, parts_key: str) -> bool:
    """True when ``parts`` does not divide ``total`` although the class's defaults of the two divide (or
    the class is unknown)."""
    if not (isinstance(total, int) and isinstance(parts, int) and parts > 0 and total % parts):
        return False
    default_total, default_parts = defaults.get(total_key), defaults.get(parts_key)
    known = isinstance(default_total, int) and isinstance(default_parts, int) and default_parts > 0
    return not known or default_total % default_parts == 0


DTYPE_FIELDS = ("dtype", "torch_dtype")  # the dtype a config declares: ``dtype`` in transformers 5


def check_config_fields(data: Mapping[str, Any], file: Path) -> None:
    """Refuse a field of the wrong kind as a config error. The fields dtypelint reads itself: the dtype must
    be a name transformers turns into a torch dtype (``"float16"``), ``architectures`` a list of class
    names. Every other field whose default in the config class of its ``model_type`` is a boolean, a
    number or a string must be one too: transformers 4 keeps ``"rms_norm_eps": "abc"`` or
    ``"tie_word_embeddings": "yes"`` and fails deep in a layer, or not at all."""
    for key in DTYPE_FIELDS:
        value = data.get(key)
        if value is not None and not (isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)):
            raise LoadError(f"{file}: {key!r} must name a torch dtype (\"float16\", \"bfloat16\", \"float32\", ...), "
                            f"not {value!r}")
    architectures = data.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(name, str) for name in architectures)):
        raise LoadError(f"{file}: 'architectures' must be a list of class names, not {architectures!r}")
    defaults = _default_fields(data.get("model_type"))
    for key, value in data.items():
        wanted = _kind_wanted(defaults.get(key), value)
        if wanted:
            raise LoadError(f"{file}: {key!r} must be {wanted}, not {value!r}")


@functools.cache
def _default_fields(model_type: Any) -> dict[str, Any]:
    """The fields of ``model_type``'s config class built with its defaults; empty for a model type this
    transformers does not know (remote code) or a class that has no defaults (encoder-decoder wrappers)."""
    from transformers import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return {}
    try:
        return dict(vars(CONFIG_MAPPING[model_type]()))
    except Exception:  # noqa: BLE001 - a config class that needs arguments has no defaults to compare with
        return {}


def _kind_wanted(default: Any, value: Any) -> str | None:
    """The kind ``value`` must have, when the default's kind says and ``value`` is not of it. A number's
    field takes a list too where its default is an integer (token ids, per-stage sizes)."""
    if value is None or default is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a boolean"
    if isinstance(default, float):
        return None if number else "a number"
    if isinstance(default, int):
        return None if number or isinstance(value, list) else "a number or a list"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    return None


def config_file(path: Path) -> Path:
    """The config a checkpoint or config path names: ``config.json`` in a directory, else the file itself."""
    return path / "config.json" if path.is_dir() else path


def load_config(config: Any, *, trust_remote_code: bool = False) -> Any:
    """A transformers config from a config object, a ``config.json`` path or a directory holding one.
    Whatever transformers raises on the file's values is a LoadError naming the file."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    path = local_path(config)
    refuse_weights_file(path)
    if path.is_dir():
        check_checkpoint_files(path)
    file = config_file(path)
    if not file.exists():
        raise LoadError(f"{shown(path)} has no config.json")
    data = parse_file(file, json.loads, "JSON")
    if not isinstance(data, dict):
        raise LoadError(f"{file}: expected a JSON object")
    if "auto_map" in data and not trust_remote_code:
        raise UsageError(f"{file} needs remote code (auto_map); pass trust_remote_code=True / --trust-remote-code")
    check_config_sizes(data, file)
    check_config_fields(data, file)
    model_type = data.get("model_type")
    try:
        if path.is_dir():
            return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        return AutoConfig.for_model(model_type, **{k: v for k, v in data.items() if k != "model_type"})
    except Exception as error:  # noqa: BLE001 - config classes validate in their own ways (transformers 5: strictly)
        if model_type is None:
            raise LoadError(f"{file} has no model_type") from None
        raise LoadError(f"{file}: cannot build a config for model_type {model_type!r}: {_joined(error)}") from None


def _joined(error: BaseException) -> str:
    """An error's message on one line: transformers 5's validation errors say what is wrong on the second."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a config declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return parse_dtype(declared) if isinstance(declared, (str, torch.dtype)) else None


def build_meta_model(config: Any, dtype: torch.dtype, model_class: ModelClass | None = None, *,
                     source: Path | None = None, max_layers: int = MAX_LAYERS) -> torch.nn.Module:
    """Build ``model_class`` (default: the class the config resolves to, ``resolve_model_class``) from a
    copy of ``config`` on the meta device, weight initialisation skipped: no memory, no values to
    initialise (some initialisers are data-dependent), and the caller's config untouched. Meta mode runs
    its forward on fake CPU stand-ins of these tensors. A build that fails is a LoadError naming
    ``source``, the config file, where there is one, and so is one that registers more than ``max_layers``
    times ``MODULES_PER_LAYER`` modules (it is stopped there).

    A constructor that reads a value (transformers 4's BEiT, FocalNet, PoolFormer and TimeSformer take
    their drop-path rates from ``torch.linspace(...)[i].item()``) cannot run on the meta device: such a
    model is built on the CPU without initialising its weights and then moved to the meta device."""
    model_class = model_class or resolve_model_class(config)
    remote = model_class.source == "auto_map"  # resolved so only with trust_remote_code
    build = model_class.builder.from_config if remote else model_class.builder._from_config
    arguments = {dtype_keyword(): dtype, **({"trust_remote_code": True} if remote else {})}
    where = f"{source}: " if source else ""
    budget = max_layers * MODULES_PER_LAYER
    try:
        with _module_budget(budget):
            try:
                with torch.device("meta"), _no_init_weights(), keeps_default_dtype():
                    model = build(copy.deepcopy(config), **arguments)
            except RuntimeError as error:
                if "meta tensor" not in str(error):
                    raise
                with _no_init_weights(), keeps_default_dtype():
                    model = build(copy.deepcopy(config), **arguments).to("meta")
    except _OverBudget:
        raise LoadError(f"{where}{model_class.name} built more than {budget} modules ({MODULES_PER_LAYER} a layer "
                        f"for --max-layers {max_layers}) and was stopped: the config asks for "
                        f"{_largest_count(config)}; raise the bound with --max-layers N") from None
    except Exception as error:  # noqa: BLE001 - a config transformers accepted can still fail in any layer
        raise LoadError(f"{where}cannot build {model_class.kind()} for model_type {config.model_type!r} "
                        f"({model_class.name}): {type(error).__name__}: {first_line(error)}") from None
    return model.eval()


class _OverBudget(Exception):
    """Raised inside a build that registered more modules than its budget."""


@contextmanager
def _module_budget(limit: int) -> Iterator[None]:
    """Count the submodules registered while the block runs (torch's global registration hook) and stop
    the block past ``limit``: a build's time grows with its modules."""
    from torch.nn.modules.module import register_module_module_registration_hook

    registered = 0

    def count(module: torch.nn.Module, name: str, submodule: torch.nn.Module | None) -> None:
        nonlocal registered
        registered += 1
        if registered > limit:
            raise _OverBudget

    handle = register_module_module_registration_hook(count)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def keeps_default_dtype() -> Iterator[None]:
    """transformers sets torch's default dtype while it builds a model and, before 5, does not restore it
    when the build raises: a failed load would change every later tensor's dtype in the process."""
    default = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    return no_init_weights()


def sample_inputs(
    model: torch.nn.Module,
    config: Any,
    *,
    batch: int = 1,
    seq_len: int = 16,
    seed: int = 0,
    float_dtype: torch.dtype | None = None,
    preprocessor: Mapping[str, Any] | None = None,
    max_input_elements: int = MAX_INPUT_ELEMENTS,
    source: Path | None = None,
) -> dict[str, torch.Tensor]:
    """The inputs the model's forward takes, made from its config (``dtypelint.inputs``): for a causal LM
    ``input_ids``, ``attention_mask`` and, where the forward takes them, ``position_ids``. Float inputs
    get ``float_dtype`` (default: the model's dtype, as a pipeline casts them). A real input the config
    sizes past ``max_input_elements`` is refused before it is allocated, naming the fields of ``source``
    (the config file) that asked for it.

    Call it inside the fake mode for a fake model, so the inputs are fake too (and any size is cheap).
    """
    from torch._guards import detect_fake_mode

    real = detect_fake_mode() is None
    check_sample_size(config, batch=batch, seq_len=seq_len, real=real)
    float_dtype = float_dtype or getattr(model, "dtype", None) or torch.float32
    return synthesize_inputs(model, config, batch=batch, seq_len=seq_len, float_dtype=float_dtype, seed=seed,
                             preprocessor=preprocessor, bound=InputBound(max_input_elements, real, source))


# Real sample inputs beyond this many tokens (batch * seq_len) need absurd memory for a dtype audit, whose
# findings do not depend on the length. Meta mode's fake inputs cost nothing at any size.
MAX_SAMPLE_TOKENS = 2**20


def check_sample_size(config: Any, *, batch: int, seq_len: int, real: bool = True) -> None:
    """Refuse a sample that cannot run: non-positive, longer than the config's ``max_position_embeddings``,
    or, for ``real`` tensors, over ``MAX_SAMPLE_TOKENS``. The CLI calls it before loading weights."""
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, not {value!r}")
    if real and batch * seq_len > MAX_SAMPLE_TOKENS:
        raise UsageError(f"batch * seq_len is {batch * seq_len} tokens, over the cap of {MAX_SAMPLE_TOKENS}")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise UsageError(f"seq_len {seq_len} is longer than the config's max_position_embeddings {limit}")


# Config fields that count layers (a list: layers per stage).
_LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
                 "num_decoder_layers", "depths")


def check_model_size(config: Any, *, max_layers: int = MAX_LAYERS, source: Path | None = None) -> None:
    """Refuse a config (or one of its sub-configs: ``text_config``, ``vision_config``, ``encoder``, ...)
    that asks for more than ``max_layers`` layers in a stack, before anything is built: a LoadError naming
    the field of ``source``, the config file. What a layer holds is bounded while it builds
    (``build_meta_model``)."""
    for prefix, part in _config_parts(config):
        for key in _LAYER_FIELDS:
            value = vars(part).get(key)
            count = sum(value) if _int_list(value) else value
            if isinstance(count, int) and not isinstance(count, bool) and count > max_layers:
                raise LoadError(f"{source or 'the config'}: {prefix + key!r} is {value}, over the bound of "
                                f"{max_layers} layers a config may ask for; raise it with --max-layers N")


def _largest_count(config: Any) -> str:
    """The config's largest layer or expert count, as ``'num_local_experts' 1000000``: what made a build
    too large, in the words of the config."""
    counts = [(value, prefix + key) for prefix, part in _config_parts(config) for key, value in vars(part).items()
              if ("layer" in key or "expert" in key) and isinstance(value, int) and not isinstance(value, bool)]
    return f"{max(counts)[1]!r} {max(counts)[0]}" if counts else "its sizes"


def _int_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, int) for item in value)


def _config_parts(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The config and, depth first, each sub-config it holds, with the dotted prefix of its fields."""
    from transformers import PretrainedConfig

    yield prefix, config
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig) and value is not config:
            yield from _config_parts(value, f"{prefix}{key}.")


def check_weights_hold(model: torch.nn.Module, path: Path, source: Path) -> None:
    """Refuse a checkpoint whose config asks for more parameters than its weight files can hold at one bit
    each (every format, low-bit ones included, stores more): ``from_pretrained`` would allocate the model
    the config describes before it finds the weights missing. ``model`` is that model, built on meta."""
    parameters = sum(parameter.numel() for parameter in model.parameters())
    try:
        stored = sum(file.stat().st_size for pattern in WEIGHT_PATTERNS for file in path.glob(pattern))
    except OSError as error:
        raise LoadError(f"cannot load {path}: cannot read its weight files: {reason(error)}") from None
    if parameters > 8 * stored:
        raise LoadError(f"cannot load {path}: {source} asks for a model of {parameters} parameters, more than its "
                        f"weight files hold ({stored} bytes: under one bit per parameter)")


IPEX_INSTALL = (
    "pip install torch==2.13.0 && pip install --no-deps ipex-llm==2.2.0 && pip install transformers==4.37.0 "
    "tokenizers==0.15.2 accelerate==0.23.0 numpy sentencepiece py-cpuinfo protobuf (in its own virtual environment)"
)


def is_low_bit(path: str | Path) -> bool:
    """True for a directory that ipex-llm's ``save_low_bit`` wrote (a config that cannot be read is not:
    ``load_config`` then says why)."""
    try:
        return "bigdl_transformers_low_bit" in parse_file(Path(path) / "config.json", json.loads, "JSON")
    except (LoadError, TypeError):
        return False


def check_checkpoint_files(directory: Path) -> None:
    """Every file of a checkpoint directory is one a loader may open: a regular, readable file (a FIFO
    would hang transformers' read of it, ``/dev/zero`` would never end)."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as error:
        raise LoadError(f"{shown(directory)}: cannot read: {reason(error)}") from None
    for entry in entries:
        if not entry.is_dir():
            check_regular_file(entry)


def load_low_bit(path: str | Path, dtype: torch.dtype | None, trust_remote_code: bool) -> torch.nn.Module:
    try:
        from ipex_llm.transformers import AutoModelForCausalLM
    except ImportError:
        raise UsageError(f"{path} is an ipex-llm low-bit checkpoint; install the ipex extra: {IPEX_INSTALL}") from None
    try:
        with keeps_default_dtype():
            model = AutoModelForCausalLM.load_low_bit(str(path), trust_remote_code=trust_remote_code,
                                                      **({"torch_dtype": dtype} if dtype is not None else {}))
    except Exception as error:  # noqa: BLE001 - loaders raise many types (SafetensorError, OSError, ...)
        raise LoadError(f"cannot load {path}: {_describe(error)}") from None
    return model.eval()


def load_pretrained(
    path: str | Path, config: Any, dtype: torch.dtype | None, trust_remote_code: bool,
    model_class: ModelClass | None = None,
) -> torch.nn.Module:
    """``from_pretrained`` of ``model_class`` (default: the class the config resolves to). A checkpoint that
    lacks tensors its config declares, or holds tensors the model does not have, is a LoadError:
    transformers would fill the gaps with random weights, and the audit of those is meaningless."""
    model_class = model_class or resolve_model_class(config, trust_remote_code=trust_remote_code)
    check_shard_indexes(Path(path))
    try:
        with keeps_default_dtype():
            model, info = model_class.builder.from_pretrained(
                path, config=config, local_files_only=True, trust_remote_code=trust_remote_code,
                output_loading_info=True, **{dtype_keyword(): dtype or "auto"},
            )
    except Exception as error:  # noqa: BLE001 - loaders raise many types (SafetensorError, OSError, ...)
        raise LoadError(f"cannot load {path}: {_describe(error)}") from None
    _refuse_incomplete(path, info)
    return model.eval()


def _describe(error: BaseException) -> str:
    """A KeyError's message is just the key: say what it is."""
    if isinstance(error, KeyError):
        return f"missing key {first_line(error)}"
    return first_line(error)


SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def shard_indexes(directory: Path) -> list[Path]:
    return [directory / name for name in SHARD_INDEXES if (directory / name).exists()]


def check_shard_indexes(directory: Path) -> None:
    """A shard index must be a JSON object with a ``metadata`` table and a non-empty ``weight_map`` of
    tensor names to shard files that exist inside ``directory``; transformers otherwise fails with a bare
    ``KeyError: 'metadata'``, or reads tensors from wherever ``../`` or an absolute name points."""
    inside = directory.resolve()
    for file in shard_indexes(directory):
        index = parse_file(file, json.loads, "JSON")
        missing = [key for key in ("metadata", "weight_map") if not isinstance(index, dict) or key not in index]
        if missing:
            raise LoadError(f"{file}: a shard index needs 'metadata' and 'weight_map'; it has no {missing[0]!r}")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise LoadError(f"{file}: 'weight_map' must map tensor names to shard file names")
        if not weight_map:
            raise LoadError(f"{file}: 'weight_map' names no shard, so there are no weights to load")
        outside = sorted({shard for shard in weight_map.values() if Path(shard).is_absolute()
                          or inside not in (inside / shard).resolve().parents})
        if outside:
            raise LoadError(f"{file}: names shard(s) outside {shown(directory)}: {', '.join(map(shown, outside[:3]))}")
        absent = sorted({shard for shard in weight_map.values() if not (directory / shard).is_file()})
        if absent:
            raise LoadError(f"{file}: names {len(absent)} shard(s) that do not exist: {', '.join(absent[:3])}")


def _refuse_incomplete(path: str | Path, info: Mapping[str, Any]) -> None:
    """transformers reports missing keys after tying weights and skipping non-persistent buffers, so what
    is left is a real gap between the checkpoint and the model its config builds."""
    for kind in ("missing", "unexpected", "mismatched"):
        # mismatched entries are (name, stored shape, model shape) tuples
        names = sorted(key[0] if isinstance(key, tuple) else key for key in info.get(f"{kind}_keys") or ())
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise LoadError(f"cannot load {path}: {len(names)} {kind} tensor(s) against its config: {shown}")


def load_entry(spec: str) -> tuple[torch.nn.Module, Any]:
    """``module.path:function`` returning ``(model, inputs)``: the way in for custom models.

    Whatever the user's code raises (a SyntaxError at import, ``sys.exit()``, an exception in the
    function) is a LoadError naming the entry; KeyboardInterrupt is left to the caller."""
    import importlib

    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise UsageError(f"--entry {spec!r} must look like module.path:function")
    try:
        with _importable_from(Path.cwd()):  # as `python -m` does: the console script's path lacks it
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise LoadError(f"--entry {spec!r}: cannot import {module_name}: {error}") from None
    except (Exception, SystemExit) as error:  # noqa: BLE001 - user code can raise anything at import
        raise LoadError(f"--entry {spec!r}: importing {module_name} raised {_user_error(error)}") from error
    if not hasattr(module, function_name):
        raise LoadError(f"--entry {spec!r}: {module_name} has no {function_name}")
    function = getattr(module, function_name)
    if not callable(function):
        raise UsageError(f"--entry {spec!r}: {function_name} is not callable (a {type(function).__name__})")
    try:
        result = function()
    except (Exception, SystemExit) as error:  # noqa: BLE001 - user code can raise anything
        raise LoadError(f"--entry {spec!r} raised {_user_error(error)}") from error  # --debug shows where
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise UsageError(f"--entry {spec!r} must return (model, inputs), got {type(result).__name__}")
    return result


@contextmanager
def _importable_from(directory: Path) -> Iterator[None]:
    entry = str(directory)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added:
            sys.path.remove(entry)


def _user_error(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"SystemExit({error.code!r})"
    return f"{type(error).__name__}: {first_line(error)}"


# Bits per element of each safetensors dtype (``F8_E4M3`` and friends are one byte, ``F4`` half of one).
SAFETENSORS_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6,
    "F6_E3M2": 6, "F4": 4, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16,
    "U8": 8, "BOOL": 8,
}
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}
# safetensors refuses a header above 100 MB.
MAX_SAFETENSORS_HEADER = 100_000_000


def stored_dtypes(path: str | Path) -> dict[str, str]:
    """Tensor name -> stored dtype, read from the safetensors headers alone (no tensor data is read).
    Each header is validated as safetensors validates it at load time (dtypes, shapes, offsets that tile
    the data exactly), so ``--static`` accepts exactly the files a load accepts, by any path."""
    directory = Path(path)
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise LoadError(f"{shown(directory)} holds no *.safetensors files to read headers from")
    dtypes: dict[str, str] = {}
    for shard in shards:
        check_regular_file(shard)
        try:
            dtypes.update(_header_dtypes(shard))
        except (ValueError, TypeError, KeyError) as error:
            raise LoadError(f"{shown(shard)}: not a valid safetensors file: {first_line(error)}") from None
    return dtypes


def _header_dtypes(shard: Path) -> dict[str, str]:
    with open_regular(shard) as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than its 8-byte header length")
        size = int.from_bytes(prefix, "little")
        if size > MAX_SAFETENSORS_HEADER:
            raise ValueError(f"a header of {size} bytes, more than the {MAX_SAFETENSORS_HEADER} safetensors reads")
        text = stream.read(size)
        data_bytes = os.fstat(stream.fileno()).st_size - 8 - size
    if len(text) < size or data_bytes < 0:
        raise ValueError("truncated within its header")
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise ValueError(f"the header is not valid JSON: {first_line(error)}") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    dtypes = {}
    for name, entry in header.items():
        stored, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if stored not in SAFETENSORS_BITS:
            raise ValueError(f"{name!r} has the unknown dtype {stored!r}")
        if not all(isinstance(n, int) and n >= 0 for n in [*shape, begin, end]):
            raise ValueError(f"{name!r} has a shape or offsets that are not non-negative integers")
        if (math.prod(shape) * SAFETENSORS_BITS[stored] + 7) // 8 != end - begin:
            raise ValueError(f"{name!r}: its offsets do not hold its shape")
        spans.append((begin, end))
        dtypes[name] = SAFETENSORS_DTYPES.get(stored, stored)
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise ValueError("tensor data overlaps or leaves gaps")
        covered = end
    if covered != data_bytes:
        raise ValueError(f"the header describes {covered} bytes of data, the file holds {data_bytes}")
    return dtypes


# The loader registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What to audit: a checkpoint or config ``path``, a config object, or an ``entry`` spec; the mode
    asked for (None: value mode where there are weights), the compute dtype and the sample size;
    ``model_class``, a transformers class name to build instead of the one the config names;
    ``inputs_dtype``, the dtype of the float inputs (None: the compute dtype, as a pipeline casts them);
    the bounds on what a config may ask for: ``max_input_elements`` and ``max_layers``."""

    path: Path | None = None
    config: Any = None
    entry: str | None = None
    mode: str | None = None
    dtype: torch.dtype | None = None
    batch: int = 1
    seq_len: int = 16
    trust_remote_code: bool = False
    model_class: str | None = None
    inputs_dtype: torch.dtype | None = None
    max_input_elements: int = MAX_INPUT_ELEMENTS  # per synthesized real input (``dtypelint.inputs``)
    max_layers: int = MAX_LAYERS  # per stack of layers (``check_model_size``), modules per layer in a build
    # A diffusers pipeline's per-component dtypes ({"text_encoder": float32, "default": float16}).
    component_dtypes: Mapping[str, torch.dtype] | None = None


@dataclass
class Loaded:
    """A model ready to trace: ``inputs`` are fake tensors of ``fake_mode`` in meta mode."""

    model: torch.nn.Module
    inputs: Any
    mode: str
    dtype: torch.dtype | None  # the compute dtype the model was loaded in (None: the model's own)
    config: Any = None
    fake_mode: Any = None
    model_class: str | None = None  # the class name built ("T5ForConditionalGeneration")
    model_source: str | None = None  # where the name came from: "config.architectures", "--model-class", ...
    made_inputs: list[SynthesizedInput] = field(default_factory=list)  # the inputs dtypelint synthesized
    # Tensor name -> the dtype its safetensors file stores (value loads of a checkpoint): ``from_pretrained``
    # casts on load, so these may differ from what the audit ran.
    stored_dtypes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the loader did that the report should say


@dataclass(frozen=True)
class Loader:
    name: str
    mode: str  # "value" or "meta": known before anything is loaded
    accepts: Callable[[Request], bool]
    load: Callable[[Request], Loaded]


LOADERS: list[Loader] = []


def register(name: str, mode: str, accepts: Callable[[Request], bool]) -> Callable:
    """Add a loader; the first registered one that accepts a request loads it."""

    def add(load: Callable[[Request], Loaded]) -> Callable[[Request], Loaded]:
        LOADERS.append(Loader(name, mode, accepts, load))
        return load

    return add


def find_loader(request: Request) -> Loader:
    """The loader for ``request``, or a UsageError saying why there is none (cheap: nothing is loaded)."""
    if request.mode is not None and request.mode not in ("value", "meta"):
        raise UsageError(f"mode must be value or meta, not {request.mode!r}")
    loader = next((loader for loader in LOADERS if loader.accepts(request)), None)
    if loader is None:
        if request.path is not None and request.mode == "value":
            raise UsageError(f"{request.path} holds no weights (*.safetensors, pytorch_model*.bin); use --mode meta")
        raise UsageError("nothing to load: give a checkpoint or config path, a config, or an entry")
    return loader


def load(request: Request) -> Loaded:
    return find_loader(request).load(request)


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def has_weights(path: Path) -> bool:
    """Weight files, or a shard index that names some (absent ones are a LoadError, not meta mode)."""
    return path.is_dir() and (any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS)
                              or bool(shard_indexes(path)))


def _wants_value(request: Request) -> bool:
    return request.path is not None and request.mode != "meta" and has_weights(request.path)


def _value_load(request: Request, model_of: Callable[[Any, torch.dtype | None, ModelClass], torch.nn.Module],
                *, low_bit: bool = False) -> Loaded:
    path, source = request.path, config_file(request.path)
    config = load_config(path, trust_remote_code=request.trust_remote_code)
    check_shard_indexes(path)  # before the weights are counted: an index may point outside the checkpoint
    check_sample_size(config, batch=request.batch, seq_len=request.seq_len)  # before the weights load
    check_model_size(config, max_layers=request.max_layers, source=source)
    model_class = _model_class(request, config, low_bit=low_bit)
    dtype = request.dtype or config_dtype(config)
    # built on meta first: a config that cannot build, or asks for more than the files hold, fails here
    measured = _model_class(request, config) if low_bit else model_class
    meta = build_meta_model(config, dtype or torch.float32, measured, source=source, max_layers=request.max_layers)
    check_weights_hold(meta, path, source)
    model = model_of(config, dtype, model_class)
    inputs = sample_inputs(model, config, batch=request.batch, seq_len=request.seq_len,
                           float_dtype=request.inputs_dtype or dtype, preprocessor=_preprocessor(path),
                           max_input_elements=request.max_input_elements, source=source)
    return Loaded(model, inputs, "value", dtype, config, model_class=model_class.name,
                  model_source=model_class.source, made_inputs=describe_inputs(inputs), stored_dtypes=_stored(path))


def _stored(path: Path | None) -> dict[str, str]:
    """The stored dtypes of a checkpoint directory's safetensors files ({} without any)."""
    if path is None or not path.is_dir() or not any(path.glob("*.safetensors")):
        return {}
    return stored_dtypes(path)


def _model_class(request: Request, config: Any, *, low_bit: bool = False) -> ModelClass:
    """ipex-llm's ``load_low_bit`` builds causal LMs only (its AutoModelForCausalLM)."""
    if low_bit:
        from transformers import AutoModelForCausalLM

        return ModelClass("AutoModelForCausalLM", AutoModelForCausalLM, "ipex-llm load_low_bit")
    return resolve_model_class(config, request.model_class, trust_remote_code=request.trust_remote_code)


def _preprocessor(path: Path | None) -> dict[str, Any]:
    """The image or feature processor's config saved beside a checkpoint (sizes and channels), if any."""
    if path is None:
        return {}
    file = (path if path.is_dir() else path.parent) / PREPROCESSOR_FILE
    if not file.is_file():
        return {}
    data = parse_file(file, json.loads, "JSON")
    return data if isinstance(data, dict) else {}


@register("entry", "value", lambda request: request.entry is not None)
def _load_entry(request: Request) -> Loaded:
    model, inputs = load_entry(request.entry)  # type: ignore[arg-type]
    return Loaded(model, inputs, "value", request.dtype, getattr(model, "config", None))


def _diffusers_component(request: Request) -> bool:
    from dtypelint.diffusion import component_class_name

    return request.path is not None and component_class_name(request.path) is not None


@register("diffusers pipeline", "value", lambda request: is_pipeline(request.path))
def _load_pipeline(request: Request) -> Loaded:
    from dtypelint.diffusion import describe_call, load_pipeline, modules_of, pipeline_call

    if request.mode == "meta":
        raise UsageError(f"{shown(request.path)} is a diffusers pipeline, which runs in value mode; audit one of "
                         f"its component folders in meta mode")
    dtypes = request.component_dtypes
    pipeline = load_pipeline(request.path, dict(dtypes) if dtypes else request.dtype)  # type: ignore[arg-type]
    call = pipeline_call(pipeline)
    dtype = (dtypes or {}).get("default", request.dtype) if dtypes else request.dtype
    return Loaded(modules_of(pipeline, dtypes), call, "value", dtype, None, model_class=type(pipeline).__name__,
                  model_source=PIPELINE_FILE, notes=[describe_call(pipeline, call)])


@register("diffusers component", "value", lambda request: _diffusers_component(request) and _wants_value(request))
def _load_component(request: Request) -> Loaded:
    from dtypelint.diffusion import component_inputs, load_component

    model = load_component(request.path, request.dtype)  # type: ignore[arg-type]
    dtype = request.dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    inputs = component_inputs(model, batch=request.batch, dtype=request.inputs_dtype or dtype)
    return Loaded(model, inputs, "value", dtype, model.config, model_class=type(model).__name__,
                  model_source="config.json _class_name", made_inputs=describe_inputs(inputs),
                  stored_dtypes=_stored(request.path))


@register("diffusers component config", "meta", lambda request: _diffusers_component(request) and request.mode != "value")
def _load_component_config(request: Request) -> Loaded:
    from dtypelint.diffusion import build_meta_component, component_inputs
    from dtypelint.fake import new_fake_mode

    dtype = request.dtype or torch.float32
    model = build_meta_component(request.path, dtype)  # type: ignore[arg-type]
    fake_mode = new_fake_mode()
    with fake_mode:
        inputs = component_inputs(model, batch=request.batch, dtype=request.inputs_dtype or dtype)
    return Loaded(model, inputs, "meta", dtype, model.config, fake_mode, model_class=type(model).__name__,
                  model_source="config.json _class_name", made_inputs=describe_inputs(inputs),
                  stored_dtypes=_stored(request.path))


@register("ipex-llm low-bit", "value", lambda request: _wants_value(request) and is_low_bit(request.path))
def _load_low_bit(request: Request) -> Loaded:
    return _value_load(request, lambda config, dtype, model_class: load_low_bit(request.path, dtype,
                                                                               request.trust_remote_code),
                       low_bit=True)


@register("from_pretrained", "value", _wants_value)
def _load_pretrained(request: Request) -> Loaded:
    return _value_load(request, lambda config, dtype, model_class: load_pretrained(
        request.path, config, dtype, request.trust_remote_code, model_class))


@register("config", "meta", lambda request: request.mode != "value" and (request.config or request.path) is not None)
def _load_config_only(request: Request) -> Loaded:
    from dtypelint.fake import new_fake_mode

    source = request.config if request.config is not None else request.path
    config = load_config(source, trust_remote_code=request.trust_remote_code)
    file = config_file(local_path(source)) if isinstance(source, (str, Path)) else None
    check_sample_size(config, batch=request.batch, seq_len=request.seq_len, real=False)
    check_model_size(config, max_layers=request.max_layers, source=file)
    dtype = request.dtype or config_dtype(config) or torch.float32
    model_class = _model_class(request, config)
    model = build_meta_model(config, dtype, model_class, source=file, max_layers=request.max_layers)
    fake_mode = new_fake_mode()
    with fake_mode:  # fake inputs: no memory however large batch x seq_len is
        inputs = sample_inputs(model, config, batch=request.batch, seq_len=request.seq_len,
                               float_dtype=request.inputs_dtype or dtype,
                               preprocessor=_preprocessor(request.path) if isinstance(source, Path) else None,
                               max_input_elements=request.max_input_elements, source=file)
    return Loaded(model, inputs, "meta", dtype, config, fake_mode, model_class=model_class.name,
                  model_source=model_class.source, made_inputs=describe_inputs(inputs),
                  stored_dtypes=_stored(request.path))
