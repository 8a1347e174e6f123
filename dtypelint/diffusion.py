"""diffusers checkpoints, as diffusers loads and runs them: a component folder (``config.json`` naming its
``_class_name``), built with the class's own ``from_pretrained(torch_dtype=...)`` (value mode) or
``from_config`` on the meta device (meta mode), fed inputs made from its forward's signature and its config;
and a pipeline folder (``model_index.json``), loaded with ``DiffusionPipeline.from_pretrained`` and its
per-component dtypes, run as a pipeline runs (one inference step, the smallest sizes its components allow)
with every component a child of one module, so each op is attributed to the component that ran it.

diffusers is an optional extra (``dtypelint[diffusers]``): without it, a diffusers folder is a usage error
that says what to install.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from dtypelint.attention import DIFFUSERS_BACKEND, backend_verdict, diffusers_attention_backends, flash_deployment
from dtypelint.dtypes import parse_dtype
from dtypelint.errors import LoadError, UsageError, first_line
from dtypelint.paths import parse_file, shown

PIPELINE_FILE = "model_index.json"
INSTALL = "pip install 'dtypelint[diffusers]'"
# Spatial side of the latents or images made for a component (capped: sizes only need to pass every block).
MAX_SIDE = 32
TEXT_TOKENS = 8  # encoder_hidden_states' sequence length


def component_class_name(path: Path) -> str | None:
    """The diffusers class a component folder's config.json names (``_class_name``), or None."""
    file = path / "config.json" if path.is_dir() else path
    if file.name != "config.json" or not file.is_file():
        return None
    data = parse_file(file, json.loads, "JSON")
    name = data.get("_class_name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and "model_type" not in data else None


def is_pipeline(path: Path | None) -> bool:
    return path is not None and path.is_dir() and (path / PIPELINE_FILE).is_file()


def require_diffusers(what: str) -> Any:
    try:
        import diffusers
    except ImportError:
        raise UsageError(f"{what} is a diffusers checkpoint; install diffusers to audit it: {INSTALL}") from None
    return diffusers


def component_class(path: Path, name: str) -> type[torch.nn.Module]:
    diffusers = require_diffusers(shown(path))
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise LoadError(f"{shown(path)}: config.json names {name!r}, which diffusers "
                        f"{diffusers.__version__} has no model class for")
    return cls


def load_component(path: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """The component as diffusers loads it: the class's own ``from_pretrained``, local files only."""
    cls = component_class(path, component_class_name(path) or "")
    try:
        return cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True).eval()
    except Exception as error:  # noqa: BLE001 - diffusers validates configs and weights in its own ways
        raise LoadError(f"{shown(path)}: diffusers cannot load {cls.__name__}: {first_line(error)}") from None


def build_meta_component(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The component's class from its config alone, on the meta device: no weight memory."""
    cls = component_class(path, component_class_name(path) or "")
    try:
        config = cls.load_config(path, local_files_only=True)
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as error:  # noqa: BLE001
        raise LoadError(f"{shown(path)}: diffusers cannot build {cls.__name__}: {first_line(error)}") from None
    return as_loaded(model, dtype).eval()


def as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` in the dtypes ``from_pretrained(torch_dtype=dtype)`` gives it: the checkpoint's floating
    tensors in ``dtype``, the ``_keep_in_fp32_modules`` in float32, and the non-persistent buffers
    (PatchEmbed's ``pos_embed``) as the class built them, since no checkpoint loads them."""
    kept = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    stored = set(model.state_dict())
    for module_name, module in model.named_modules():
        wide = any(part in kept for part in module_name.split("."))
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                qualified = f"{module_name}.{name}" if module_name else name
                if tensor is None or not tensor.is_floating_point() or qualified not in stored:
                    continue
                cast = tensor.to(torch.float32 if wide else dtype)
                table[name] = torch.nn.Parameter(cast, tensor.requires_grad) if name in module._parameters else cast
    return model


def component_inputs(model: torch.nn.Module, *, batch: int, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """A forward's required arguments, and the optional ones its config says the model uses (class labels,
    SDXL's added conditions, Flux's guidance), made from the config as a pipeline makes them. A required
    argument nothing here knows how to make is a LoadError naming it (use --entry)."""
    signature = inspect.signature(model.forward)
    if signature.return_annotation in (None, "None"):
        name, host = type(model).__name__, _loaded_by(type(model))
        raise LoadError(f"{name}.forward returns nothing: a {name} holds weights another model loads"
                        f"{f' ({host})' if host else ''}; audit that model")
    documented, parameters = inspect.getdoc(model.forward) or "", signature.parameters
    # What the model's own code and layers say, read once: its frame axis, whether its docstring says flow
    # matching, the convolution its sample enters by.
    entry = _entry_convolution(model)
    stored = dict(getattr(model, "config", {}) or {})
    config = {"_class_name": type(model).__name__, "_video": isinstance(entry, torch.nn.Conv3d),
              "_input_channels": getattr(entry, "in_channels", None),
              "_waveform": None if isinstance(entry, (torch.nn.Conv2d, torch.nn.Conv3d)) else _waveform_samples(stored),
              "_packed": _packed(parameters),
              "_input_features": None if entry else _entry_features(model),
              "_frame_axis": _frame_axis(model.forward), "_flow_matching": bool(_FLOW.search(documented)),
              "_per_frame_timestep": _per_frame_timestep(type(model)), **stored}
    generator = torch.Generator().manual_seed(seed)
    made: dict[str, Any] = {}
    for name, parameter in parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = None
        if name in _DOCUMENTED_FIRST or (parameter.default is inspect.Parameter.empty and name not in _MAKERS):
            value = _documented_input(documented, name, config, batch, dtype, generator)
        if value is None and (maker := _MAKERS.get(name)) is not None:
            value = maker(config, made, parameters, batch, dtype, generator)
        if value is not None:
            made[name] = value
        elif parameter.default is inspect.Parameter.empty:
            raise LoadError(f"{type(model).__name__}.forward needs {name!r}, which dtypelint cannot make from the "
                            f"config; audit it with --entry MODULE:FUNCTION returning (model, inputs)")
    if "return_dict" in parameters:
        made["return_dict"] = True
    return made


# A documented shape beats the image-latents default for these (audio, sequences, lengths shared with the text).
_DOCUMENTED_FIRST = ("sample", "hidden_states", "encoder_hidden_states")
_BATCH_WORDS = ("batch", "batch_size", "batch size", "b", "bs")
_TEXT_WORDS = ("text", "ctx", "encoder", "token", "caption", "prompt", "context", "cond")
_LENGTH_WORDS = ("length", "len", "seq", "height", "width", "time", "t", "h", "w", "l", "n")
_WIDTH_WORDS = ("channel", "dim", "hidden_size", "features", "mels")
_NOT_FLOATING = ("ids", "indices", "index", "mask", "tags", "position", "shapes", "lens", "tokens")


def _shape_documented(documented: str, name: str) -> list[str] | None:
    """The dimensions a forward's docstring gives an argument: ``name (`torch.Tensor` of shape `(batch,
    in_channels, length)`)``, or a shape in backticks, round or square, on its line or the two indented below."""
    introduced = re.search(rf"^(?P<indent>\s*){re.escape(name)}(?: \(|:)(?P<line>[^\n]*(?:\n(?P=indent)\s+[^\n]*){{0,2}})",
                           documented, re.M)
    shape = re.search(r"`[(\[]([^`()\[\]]+)[)\]]`", introduced["line"]) if introduced else None
    return [word.strip() for word in shape[1].split(",") if word.strip()] if shape else None


def _dimension(word: str, config: Mapping[str, Any], batch: int, *, text: bool) -> int | None:
    """A documented dimension's size: the batch, two frames, a width the config names (else the text's for a text
    argument, Ernie's `embed_dims`, or the sample's channels, AnyFlow's `num_channels`), a few tokens for a text
    sequence (a text argument's `sequence_length`), the latents' side for any other length (MiniMax-Music's
    frame-aligned condition shares it)."""
    lowered = word.lower()
    if lowered in _BATCH_WORDS:
        return batch
    if word.isdigit():
        return int(word)
    if config["_waveform"] and ("sample" in lowered or lowered in ("t", "time", "length")):
        return config["_waveform"]
    if "frame" in lowered:
        return 2
    if any(mark in lowered for mark in _WIDTH_WORDS) or lowered == "d" or lowered.startswith("d_"):  # SANA's D_caption
        value = config.get(word, _text_width(config) if text else _sample_channels(config))
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if any(mark in lowered for mark in _TEXT_WORDS) or (text and lowered.startswith(("seq", "num_tokens"))):
        return TEXT_TOKENS
    if any(lowered == mark or lowered.startswith(mark + "_") or lowered.endswith("_" + mark) or
           (len(mark) > 2 and mark in lowered) for mark in _LENGTH_WORDS):
        return _side(config)
    return None


def _documented_input(documented: str, name: str, config: Mapping[str, Any], batch: int, dtype: torch.dtype,
                      generator: torch.Generator) -> torch.Tensor | None:
    """A floating input in the shape the forward's docstring gives it, where every dimension resolves; never an
    index, mask or id, whose values a random tensor would not stand for."""
    if any(mark in name for mark in _NOT_FLOATING):
        return None
    words = _shape_documented(documented, name)
    text = any(mark in name for mark in _TEXT_WORDS)
    if config["_packed"] and name in _MAKERS and _MAKERS[name] is _sample and len(words or ()) != 3:
        return None  # Flux-style latents are a sequence of patches, whatever a copied docstring says
    sizes = [_dimension(word, config, batch, text=text) for word in words or ()]
    if not sizes or None in sizes:
        return None
    return torch.randn(*sizes, generator=generator).to(dtype)


def _loaded_by(model_class: type) -> str | None:
    """The constructor of its own module that takes the class (``UNetMotionModel.from_unet2d(unet,
    motion_adapter: MotionAdapter)``): where a class with no forward of its own goes."""
    module = inspect.getmodule(model_class)
    for host in vars(module).values() if module else ():
        if not isinstance(host, type) or host is model_class or host.__module__ != model_class.__module__:
            continue
        for method_name, method in vars(host).items():
            function = getattr(method, "__func__", method)
            annotations = getattr(function, "__annotations__", {}) if callable(function) else {}
            if any(model_class.__name__ in str(annotation) for annotation in annotations.values()):
                return f"{host.__name__}.{method_name}"
    return None


def _entry_convolution(model: torch.nn.Module) -> torch.nn.Module | None:
    """The convolution the sample enters by: the shallowest ``conv_in`` (diffusers' name for it, ``base_conv_in`` in
    ControlNet-XS), else the first.
    A 3D one means the sample is a video (Wan's and QwenImage's VAEs); its input channels stand in for a config
    that names none (ControlNet-XS)."""
    convolutions = [(name, module) for name, module in model.named_modules()
                    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    entries = [(name.count("."), index) for index, (name, _) in enumerate(convolutions)
               if name.rpartition(".")[2].endswith("conv_in")]
    if entries:
        return convolutions[min(entries)[1]][1]
    return convolutions[0][1] if convolutions else None


def _entry_features(model: torch.nn.Module) -> int | None:
    """The width of a model without convolutions that starts with a linear layer (Flux's Redux projection):
    its sample is a few tokens of that width."""
    first = next((module for module in model.modules() if isinstance(module, torch.nn.Linear)), None)
    return None if first is None else first.in_features


_SAMPLING_RATES = ("sampling_rate", "sample_rate")
_AUDIO_STRIDES = ("downsampling_ratios", "downsampling_ratio", "encoder_rates", "encoder_strides", "strides", "enc_strides",
                  "enc_hop_length")


def _waveform_samples(config: Mapping[str, Any]) -> int | None:
    """A waveform's length for an audio model (its config names a sampling rate): two latent frames' worth of
    samples, the product of its encoder's strides, patch and STFT hop; None for any other model."""
    if not any(isinstance(config.get(key), int) for key in _SAMPLING_RATES):
        return None
    per_frame = 1
    for key in (*_AUDIO_STRIDES, "patch_size", "hop_length"):
        value = config.get(key)
        for stride in value if isinstance(value, (list, tuple)) else (value,):
            per_frame *= stride if isinstance(stride, int) and not isinstance(stride, bool) and stride > 0 else 1
    return 2 * per_frame


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _patch(config: Mapping[str, Any]) -> tuple[int, int]:
    """The patch's (frames, side): video transformers patch time too (Wan's ``(1, 2, 2)``, ``patch_size_t``);
    0 frames for an image model."""
    size = config.get("patch_size") or 1
    if isinstance(size, (list, tuple)):
        return (int(size[0]) if len(size) == 3 else 0), int(size[-1])
    frames = config.get("patch_size_t")
    return (int(frames) if isinstance(frames, int) else 0), int(size)


def _side(config: Mapping[str, Any]) -> int:
    """The latents' side: the config's sample size capped, a multiple of every down-sampling step."""
    widths = config.get("block_out_channels") or config.get("channels")  # T2I-Adapter's
    factor = 2 ** max(len(widths) - 1 if isinstance(widths, (list, tuple)) else 0, 0) * _patch(config)[1]
    factor *= config.get("downscale_factor") if isinstance(config.get("downscale_factor"), int) else 1
    side = min(int(_first(config.get("sample_size")) or MAX_SIDE), MAX_SIDE)
    return max(factor, side // factor * factor)


def _packed(parameters: Mapping[str, inspect.Parameter]) -> bool:
    """Flux-style transformers take latents as a sequence of patches with positions (``img_ids``)."""
    return "img_ids" in parameters


def _sample(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
            dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
    channels = _sample_channels(config)
    if not isinstance(channels, int):
        features = config["_input_features"]
        return None if features is None else torch.randn(batch, TEXT_TOKENS, features, generator=generator).to(dtype)
    if config["_waveform"]:
        return torch.randn(batch, channels, config["_waveform"], generator=generator).to(dtype)
    side = _side(config)
    if _packed(parameters):
        return torch.randn(batch, (side // 2) ** 2, channels, generator=generator).to(dtype)
    axis = config["_frame_axis"]
    if axis == 1:
        return torch.randn(batch, 2, channels, side, side, generator=generator).to(dtype)
    video = axis == 2 or config["_video"] or "3D" in str(config.get("_class_name"))
    if frames := _patch(config)[0] or (_video_frames(config) if video else 0):
        return torch.randn(batch, channels, frames, side, side, generator=generator).to(dtype)
    return torch.randn(batch, channels, side, side, generator=generator).to(dtype)


def _sample_channels(config: Mapping[str, Any]) -> int | None:
    """The sample's channels: as the config names them, else the entry convolution's."""
    return next((config[key] for key in ("in_channels", "input_channels", "audio_channels")
                 if isinstance(config.get(key), int)), config["_input_channels"])


def _video_frames(config: Mapping[str, Any]) -> int:
    """Frames for a video sample: one more than a causal video VAE's temporal compression (its encoder takes
    1 + k * ratio frames: KVAE's 5), else two."""
    ratio = next((config[key] for key in ("temporal_compression_ratio", "temporal_compress_times")
                  if isinstance(config.get(key), int)), None)
    return 1 + ratio if ratio else 2


def _frame_axis(forward: Callable[..., Any]) -> int | None:
    """The sample's axis a forward reads its frame count from: 1 for Stable Video Diffusion's UNet
    (``batch_size, num_frames = sample.shape[:2]``), 2 for AnimateDiff's (``sample.shape[2]``) and I2VGen-XL's
    (``batch_size, channels, num_frames, height, width = sample.shape``). Its code, not its docstring, which
    some classes copy unchanged."""
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):  # no source at hand (a compiled or built-in forward)
        return None
    for unpacked in re.finditer(r"^\s*([\w\s,]+?)\s*=\s*sample\.shape(?:\[(\d+)\]|\[:\d+\])?\s*$", source, re.M):
        names = [name.strip() for name in unpacked[1].split(",")]
        if "num_frames" in names:
            return int(unpacked[2]) if unpacked[2] else names.index("num_frames")
    return None


@functools.cache
def _per_frame_timestep(model_class: type) -> bool:
    """Whether the class's code reads a timestep per frame (AnyFlow's ``batch_size, num_frames =
    timestep.shape``); its pipelines repeat the step along the latents' second axis."""
    try:
        source = inspect.getsource(inspect.getmodule(model_class))  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False
    return bool(re.search(r"batch_size,\s*num_frames\s*=\s*timesteps?\.shape\b", source))


def _timestep(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
              dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """The timestep as diffusers' own pipelines for the class pass it: a float in the latents' dtype where their
    scheduler's timesteps are floating (flow matching), divided by 1000 where they divide it (Flux); the
    scheduler's integer step otherwise. A class no pipeline names is flow matching where its forward's docstring
    says so or it takes pooled projections (SD3, Flux)."""
    name = str(config.get("_class_name"))
    timing = pipeline_timestep(name)
    if timing is None:
        flow = "pooled_projections" in parameters or config["_flow_matching"]
        timing = (flow, flow and _packed(parameters))
    floating, unit = timing
    latents = made.get("hidden_states", made.get("sample"))
    shape = (batch, latents.shape[1]) if config["_per_frame_timestep"] and latents is not None else (batch,)
    if floating:
        return torch.full(shape, 0.5 if unit else 500.0, dtype=dtype)
    return torch.full(shape, 10, dtype=torch.long)


_INIT = re.compile(r"def __init__\(\s*self,(?P<parameters>.*?)\)(?:\s*->\s*None)?:", re.S)
_ANNOTATED = re.compile(r"(\w+)\s*:\s*([A-Za-z_]\w*)")
_FLOW = re.compile(r"flow[- ]matching", re.I)
_MASK_CAST = re.compile(r"prompt_attention_mask\s*=\s*\w*prompt_attention_mask\.to\(\s*(?:dtype=)?\w*dtype\b")
_MASK_BOOL = re.compile(r"prompt_attention_mask\s*=\s*\w*prompt_attention_mask\.bool\(\)")
_DIVIDED = re.compile(r"\b(?:t|timesteps?)\b[^\n]*/\s*1000\b")


@functools.cache
def _pipelines() -> dict[str, list[tuple[str, bool, str]]]:
    """Each class a diffusers pipeline's ``__init__`` takes (by its annotation) -> (the scheduler class that
    pipeline is annotated with, whether its source divides the timestep by 1000, how it passes the prompt's
    attention mask: "model" (cast to a dtype), "bool" or "tokens" (as the tokenizer made it)), for every
    pipeline. Read from the installed sources, not imported: importing every pipeline costs seconds and
    optional packages."""
    import diffusers

    found: dict[str, list[tuple[str, bool, str]]] = {}
    for source in sorted(Path(diffusers.__file__).parent.joinpath("pipelines").rglob("pipeline_*.py")):
        if "deprecated" in source.parts:
            continue
        text = source.read_text(encoding="utf-8", errors="replace")
        divided = bool(_DIVIDED.search(text))
        mask = "model" if _MASK_CAST.search(text) else "bool" if _MASK_BOOL.search(text) else "tokens"
        for init in _INIT.finditer(text):
            annotated = dict(_ANNOTATED.findall(init["parameters"]))
            scheduler = annotated.pop("scheduler", None)
            for component in set(annotated.values()) if scheduler else ():
                found.setdefault(component, []).append((scheduler, divided, mask))
    return found


@functools.cache
def _floating_steps(scheduler_name: str) -> bool | None:
    """Whether a scheduler class's timesteps are floating, from its own ``set_timesteps`` on its default
    config; None for an annotation that is no scheduler class, or one that needs more to set its steps."""
    import diffusers

    scheduler_class = getattr(diffusers, scheduler_name, None)
    if not isinstance(scheduler_class, type) or not hasattr(scheduler_class, "set_timesteps"):
        return None
    try:
        # The probe's tensors are real even when the inputs are made fake; its numpy warnings are not the user's.
        with unset_fake_temporarily(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = scheduler_class()
            scheduler.set_timesteps(2)
    except Exception:  # noqa: BLE001 - its steps need what a pipeline passes; the class stays undecided
        return None
    return bool(torch.is_floating_point(scheduler.timesteps))


def pipeline_timestep(class_name: str) -> tuple[bool, bool] | None:
    """(floating, divided by 1000) as most of the pipelines that take ``class_name`` pass its timestep; None
    where no pipeline whose scheduler decides it takes the class."""
    votes = Counter((floating, floating and divided) for scheduler, divided, _ in _pipelines().get(class_name, ())
                    if (floating := _floating_steps(scheduler)) is not None)
    return votes.most_common(1)[0][0] if votes else None


def _text_width(config: Mapping[str, Any]) -> int | None:
    for key in ("caption_channels", "joint_attention_dim", "encoder_hid_dim", "cross_attention_dim", "text_dim",
                "text_embed_dim", "cap_feat_dim", "context_in_dim", "text_hidden_dim", "condition_dim",
                "cond_token_dim", "dit_text_dim", "text_in_dim"):
        if isinstance(width := _first(config.get(key)), int):
            return width
    return None


def _encoder_hidden_states(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter],
                           batch: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
    width = _text_width(config)
    return None if width is None else torch.randn(batch, TEXT_TOKENS, width, generator=generator).to(dtype)


def _text_mask(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
               dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
    """The tokenizer's attention mask over the text tokens where the forward requires one: cast to the model's
    dtype where the pipelines that take the class cast it (HunyuanVideo's ``prompt_attention_mask.to(
    transformer_dtype)``), bool where they make it bool (LTX, Mochi), the tokenizer's int64 where they pass it
    as it comes (Lumina2 sizes its rotary table from its sum); the model's dtype for a class no pipeline takes."""
    if parameters["encoder_attention_mask"].default is not inspect.Parameter.empty or "encoder_hidden_states" not in made:
        return None
    kinds = [kind for _, _, kind in _pipelines().get(str(config.get("_class_name")), ())]
    kind = Counter(kinds).most_common(1)[0][0] if kinds else "model"
    mask_dtype = {"model": dtype, "bool": torch.bool}.get(kind, torch.long)
    return torch.ones(batch, made["encoder_hidden_states"].shape[1], dtype=mask_dtype)


def _text_lengths(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
                  dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
    """Each prompt's token count, int64 as Ernie-Image's pipeline pads them: every text token is real."""
    text = next((value for key, value in made.items() if key.startswith("text") and torch.is_tensor(value)), None)
    return None if text is None else torch.full((batch,), text.shape[1], dtype=torch.long)


def _pooled(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
            dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
    width = config.get("pooled_projection_dim")
    return torch.randn(batch, width, generator=generator).to(dtype) if isinstance(width, int) else None


def _ids(count: Callable[[dict], int]) -> Callable[..., torch.Tensor | None]:
    def make(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
             dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
        return torch.zeros(count(made), 3, dtype=dtype)
    return make


def _guidance(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
              dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
    return torch.full((batch,), 3.5, dtype=dtype) if config.get("guidance_embeds") else None


def _class_labels(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
                  dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
    """A class index for class-conditional models (``num_class_embeds``, DiT's ``num_embeds_ada_norm``), the
    timestep for a UNet whose class embedding is one."""
    if config.get("class_embed_type") == "timestep":
        return torch.full((batch,), 10, dtype=torch.long)
    if config.get("num_class_embeds") or config.get("num_embeds_ada_norm"):
        return torch.zeros(batch, dtype=torch.long)
    return None


def _added_cond_kwargs(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter],
                       batch: int, dtype: torch.dtype, generator: torch.Generator) -> dict | None:
    """SDXL's pooled text embeddings and size conditions; PixArt's resolution and aspect ratio."""
    if config.get("addition_embed_type") == "text_time":
        time_ids = 6
        text = config["projection_class_embeddings_input_dim"] - time_ids * config["addition_time_embed_dim"]
        return {"text_embeds": torch.randn(batch, text, generator=generator).to(dtype),
                "time_ids": torch.full((batch, time_ids), 32.0, dtype=dtype)}
    if "use_additional_conditions" in config or config.get("caption_channels"):
        side = float(_side(config) * 8)
        return {"resolution": torch.full((batch, 2), side, dtype=dtype),
                "aspect_ratio": torch.ones(batch, 1, dtype=dtype)}
    return None


def _size_condition(fill: float | None) -> Callable[..., torch.Tensor]:
    """CogView's micro-conditions, one (height, width) pair per sample in the prompt embeddings' dtype: the
    original and target sizes are the image's pixel size, the crop's top-left corner is (0, 0)."""
    def make(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
             dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        return torch.full((batch, 2), float(_side(config) * 8) if fill is None else fill, dtype=dtype)
    return make


def _added_time_ids(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter],
                    batch: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
    """Stable Video Diffusion's (fps, motion bucket, noise augmentation), in the latents' dtype."""
    return torch.tensor([[6.0, 127.0, 0.02]] * batch, dtype=dtype)


def _image_shapes(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
                  dtype: torch.dtype, generator: torch.Generator) -> list | None:
    """QwenImage's (frames, height, width) of the packed latents per sample, as its pipelines list them."""
    latents = made.get("hidden_states")
    if latents is None or latents.dim() != 3:
        return None
    tokens = latents.shape[1]
    height = max(side for side in range(1, int(tokens ** 0.5) + 1) if tokens % side == 0)
    return [[(1, height, tokens // height)]] * batch


def _controlnet_cond(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter],
                     batch: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
    """The conditioning image, at the pixel size of the latents (the conditioning embedding downsamples by 8)."""
    channels = config.get("conditioning_channels", 3)
    side = _side(config) * 2 ** (len(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)) - 1)
    return torch.randn(batch, channels, side, side, generator=generator).to(dtype)


def _like_sample(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
                 dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
    """Latents of the conditioning image, shaped as the sample (I2VGen-XL's ``image_latents``)."""
    sample = made.get("sample")
    return None if sample is None else torch.randn(sample.shape, generator=generator).to(dtype)


def _timestep_ratio(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter], batch: int,
                    dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Stable Cascade's timestep as a fraction of the schedule, in the latents' dtype as its pipelines pass it."""
    return torch.full((batch,), 0.5, dtype=dtype)


def _frames_per_second(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter],
                       batch: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """I2VGen-XL's frame-rate micro-condition: an integer, embedded like a timestep."""
    return torch.full((batch,), 16, dtype=torch.long)


def _pooled_text_tokens(config: Mapping[str, Any], made: dict, parameters: Mapping[str, inspect.Parameter],
                        batch: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor | None:
    """Stable Cascade's pooled CLIP text embedding, one token wide."""
    width = config.get("clip_text_pooled_in_channels")
    return torch.randn(batch, 1, width, generator=generator).to(dtype) if isinstance(width, int) else None


_MAKERS: dict[str, Callable[..., Any]] = {
    "sample": _sample,
    "hidden_states": _sample,
    "x": _sample,
    "timestep": _timestep,
    "r_timestep": _timestep,  # AnyFlow's flow-map target step, made as the source step
    "timestep_ratio": _timestep_ratio,
    "fps": _frames_per_second,
    "image_latents": _like_sample,
    "clip_text_pooled": _pooled_text_tokens,
    "encoder_hidden_states": _encoder_hidden_states,
    "pooled_projections": _pooled,
    "img_ids": _ids(lambda made: made["hidden_states"].shape[1]),
    "txt_ids": _ids(lambda made: made["encoder_hidden_states"].shape[1]),
    "encoder_attention_mask": _text_mask,
    "text_lens": _text_lengths,
    "guidance": _guidance,
    "class_labels": _class_labels,
    "added_cond_kwargs": _added_cond_kwargs,
    "controlnet_cond": _controlnet_cond,
    "original_size": _size_condition(None),
    "target_size": _size_condition(None),
    "crop_coords": _size_condition(0.0),
    "added_time_ids": _added_time_ids,
    "img_shapes": _image_shapes,
}


# Attention backends -------------------------------------------------------------------------------------

# transformers' flash implementation names -> diffusers' attention-dispatcher backends.
TRANSFORMERS_FLASH = {"flash_attention_2": "flash", "flash_attention_3": "_flash_3"}


def is_diffusers_model(model: torch.nn.Module) -> bool:
    """A diffusers model, or a module holding one (a pipeline's components)."""
    return any(type(module).__module__.startswith("diffusers.") for module in (model, *model.children()))


def dispatcher_backend(implementation: str) -> str:
    """The dispatcher backend a deployment names: its own name (``sage``), or transformers' flash name."""
    name = TRANSFORMERS_FLASH.get(implementation, implementation)
    backends = diffusers_attention_backends()
    if name not in backends:
        raise UsageError(f"diffusers' attention dispatcher has no backend {implementation!r}; it knows "
                         f"{', '.join(backends)}")
    return name


def runs_flash_attn(backend: str) -> bool:
    """A dispatcher backend that calls flash-attn's kernels (``flash``, ``_flash_3_hub``), not SDPA's."""
    return "flash" in backend and not backend.startswith("_native")


@contextmanager
def attention_backend_standin(implementation: str) -> Iterator[None]:
    """diffusers' dispatcher set to the backend ``implementation`` names, its kernel replaced for the block by
    a CPU stand-in with SDPA's numerics: every dispatched attention runs and is recorded as a call of that
    backend, with q, k and v exactly as the dispatcher hands them over. A flash-attn backend is declared a
    flash deployment (its contract judges the calls); any other runs the backend's own checks (diffusers'
    registered constraints, less the part that wants a CUDA device) and records their verdict."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    backend = AttentionBackendName(dispatcher_backend(implementation))
    registry = _AttentionBackendRegistry
    saved = registry._active_backend, registry._backends.get(backend)
    if runs_flash_attn(backend.value):
        declared = "flash_attention_3" if "3" in backend.value else "flash_attention_2"
        registry._backends[backend] = _flash_in_diffusers_layout
    else:
        declared = DIFFUSERS_BACKEND + backend.value
        registry._backends[backend] = _checked_standin(registry._constraints.get(backend, []))
    registry._active_backend = backend
    try:
        with flash_deployment(declared):
            yield
    finally:
        registry._active_backend = saved[0]
        registry._backends[backend] = saved[1]


def _flash_in_diffusers_layout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
                               is_causal: bool = False, scale: float | None = None, **_: Any) -> torch.Tensor:
    """A flash kernel's CPU stand-in: flash takes no mask."""
    return _sdpa_in_diffusers_layout(query, key, value, dropout_p=dropout_p, is_causal=is_causal, scale=scale)


def _sdpa_in_diffusers_layout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **options: Any) -> torch.Tensor:
    """SDPA on diffusers' backend layout, (batch, sequence, heads, head_dim)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), **options)
    return out.transpose(1, 2)


def _checked_standin(constraints: list[Callable[..., None]]) -> Callable[..., torch.Tensor]:
    """A backend's stand-in: its checks' first refusal (a ValueError) recorded with the call, then SDPA."""
    from diffusers.models.attention_dispatch import _check_device

    # A check that wants a CUDA device (and a compute capability) keeps only its same-device-and-dtype part.
    checks = [_check_device if "device_cuda" in check.__name__ else check for check in constraints]

    def standin(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False, **_: Any) -> torch.Tensor:
        refusal = None
        for check in checks:
            try:
                check(query=query, key=key, value=value, attn_mask=attn_mask, is_causal=is_causal)
            except ValueError as error:
                refusal = str(error)
                break
        with backend_verdict(refusal):
            return _sdpa_in_diffusers_layout(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return standin


# Pipelines ----------------------------------------------------------------------------------------------

def parse_component_dtypes(value: str) -> dict[str, torch.dtype] | None:
    """``text_encoder=float32,default=float16`` as diffusers' ``torch_dtype`` mapping; None for one dtype."""
    if "=" not in value:
        return None
    dtypes: dict[str, torch.dtype] = {}
    for part in value.split(","):
        name, _, dtype = part.partition("=")
        if not name.strip() or not dtype.strip():
            raise UsageError(f"--dtype {value!r}: each part is COMPONENT=DTYPE (default=DTYPE for the rest)")
        dtypes[name.strip()] = parse_dtype(dtype)  # type: ignore[assignment]
    return dtypes


class PipelineModules(torch.nn.Module):
    """A pipeline's model components as the children of one module, whose forward runs the pipeline: the
    tracer attributes each op to the component (``unet.down_blocks.0...``), and ``state.preserved`` puts
    every component back. The scheduler's state is put back too. ``call_notes`` says, per call, which
    components ran, and each component called with floating inputs off its own dtype (and which
    component made them, where the pipeline passed the tensor on as it was). ``calls_again``: a second call
    (``--steps``, default 2) runs the same call on the state the first left (a VAE left upcast)."""

    calls_again = True

    def __init__(self, pipeline: Any, dtypes: Mapping[str, torch.dtype] | None = None) -> None:
        super().__init__()
        for name, component in pipeline.components.items():
            if isinstance(component, torch.nn.Module):
                self.add_module(name, component)
        # The components asked in a dtype of their own (``--dtype text_encoder=float32,default=float16``).
        self.component_dtypes = {name: dtype for name, dtype in (dtypes or {}).items() if name in self._modules}
        self.__dict__["pipeline"] = pipeline  # not a child: it holds the same components
        self.call_notes: list[list[str]] = []
        # component -> how the pipeline first called it off its dtype: the cause of the errors inside it
        self.boundaries: dict[str, str] = {}

    def forward(self, **call: Any) -> Any:
        scheduler = getattr(self.pipeline, "scheduler", None)
        saved = copy.deepcopy(scheduler.__dict__) if scheduler is not None else None
        made: dict[int, str] = {}  # id of a component's output tensor -> the component
        seen: dict[str, None] = {}  # the components called, in order
        notes: list[str] = []
        self.call_notes.append(notes)
        handles = []
        for name, component in self.named_children():
            entered = self._entered(name, made, seen, notes)
            # its children too: a pipeline may call a method (vae.decode) rather than the forward
            for module in (component, *component.children()):
                handles.append(module.register_forward_pre_hook(entered, with_kwargs=True))
            handles.append(component.register_forward_hook(self._left(name, made)))
        try:
            with torch.no_grad():
                return self.pipeline(**call)
        finally:
            for handle in handles:
                handle.remove()
            notes.insert(0, f"components run: {', '.join(seen) or 'none'}")
            if scheduler is not None:
                scheduler.__dict__.clear()
                scheduler.__dict__.update(saved)

    def _entered(self, name: str, made: dict[int, str], seen: dict[str, None], notes: list[str]) -> Callable[..., None]:
        component = getattr(self, name)

        def check(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            own = next((p.dtype for p in component.parameters() if p.is_floating_point()), None)
            if name in seen:
                return
            seen[name] = None
            if own is None:
                return
            positional = list(inspect.signature(module.forward).parameters)
            named = [*((positional[index] if index < len(positional) else f"argument {index}", value)
                       for index, value in enumerate(args)), *kwargs.items()]
            off = [f"{key} {str(value.dtype).removeprefix('torch.')}"
                   + (f" (the output of {maker})" if (maker := _maker(value, made)) else "")
                   for key, value in named
                   if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 1
                   and value.dtype != own]  # a timestep is cast where it is embedded
            if off:
                called = name if module is component else f"{name} ({type(module).__name__} {_name_in(component, module)})"
                boundary = f"the pipeline calls {called} ({str(own).removeprefix('torch.')}) with {', '.join(off)}"
                notes.append(boundary)
                self.boundaries.setdefault(name, boundary)
        return check

    @staticmethod
    def _left(name: str, made: dict[int, str]) -> Callable[..., None]:
        def record(_: torch.nn.Module, args: tuple, output: Any) -> None:
            values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) \
                else [output]
            for value in values:
                if isinstance(value, torch.Tensor):
                    made[id(value)] = name
        return record


def _maker(tensor: torch.Tensor, made: dict[int, str]) -> str | None:
    """The component whose output ``tensor`` is, or was computed from by the pipeline's own code."""
    if id(tensor) in made:
        return made[id(tensor)]
    tracer = next((mode for mode in reversed(_get_current_dispatch_mode_stack()) if hasattr(mode, "upstream_modules")),
                  None)
    components = set(made.values())
    upstream = tracer.upstream_modules(tensor) if tracer is not None else []
    return next((module.split(".")[0] for module in upstream if module.split(".")[0] in components), None)


def _name_in(parent: torch.nn.Module, child: torch.nn.Module) -> str:
    return next((name for name, module in parent.named_children() if module is child), "?")


def modules_of(pipeline: Any, dtypes: Mapping[str, torch.dtype] | None = None) -> PipelineModules:
    """``PipelineModules`` of ``pipeline``, under the pipeline's class name (the name reports show);
    ``dtypes``: the per-component dtypes it was loaded with."""
    named = type(type(pipeline).__name__, (PipelineModules,), {"__module__": __name__})
    return named(pipeline, dtypes)


def load_pipeline(path: Path, dtype: torch.dtype | Mapping[str, torch.dtype] | None) -> Any:
    diffusers = require_diffusers(shown(path))
    try:
        pipeline = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=dtype if dtype is not None else
                                                               torch.float32, local_files_only=True)
    except Exception as error:  # noqa: BLE001
        raise LoadError(f"{shown(path)}: diffusers cannot load the pipeline: {first_line(error)}") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def describe_call(pipeline: Any, call: Mapping[str, Any]) -> str:
    shown_call = ", ".join(f"{key}={value!r}" for key, value in call.items() if key != "generator")
    return f"ran {type(pipeline).__name__}({shown_call}), every component traced"


def pipeline_call(pipeline: Any) -> dict[str, Any]:
    """The smallest call the pipeline runs: one step, a short prompt, the smallest latents its UNet or
    transformer takes, a tensor output (the VAE still decodes)."""
    parameters = inspect.signature(pipeline.__call__).parameters
    call: dict[str, Any] = {"num_inference_steps": 1, "output_type": "pt"}
    if "prompt" in parameters:
        call["prompt"] = "a photo of a cat"
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    vae_scale = getattr(pipeline, "vae_scale_factor", 8)
    if denoiser is not None and "height" in parameters:
        side = _side(dict(denoiser.config)) * vae_scale
        call.update(height=side, width=side)
    if "generator" in parameters:
        call["generator"] = torch.Generator().manual_seed(0)
    return call
