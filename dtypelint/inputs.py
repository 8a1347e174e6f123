"""Sample inputs for a transformers model, per modality, made from its config and its own forward signature.

Each input the forward takes and the config can size is made: token ids and their mask (text),
``decoder_input_ids`` from ``decoder_start_token_id`` (encoder-decoders), ``pixel_values`` (vision; size
and channels from the config, its ``vision_config`` or the ``preprocessor_config.json`` beside the
checkpoint), ``input_features`` (log-mel spectrograms) or ``input_values`` (raw audio) for speech, and
both towers' inputs for dual encoders (CLIP-like). Float inputs get ``float_dtype``: the compute dtype, the
way a pipeline casts them, or another dtype to audit a pipeline that forgets the cast.

Made inside a ``FakeTensorMode``, the inputs are fake too: shapes and dtypes, no memory. Real inputs are
bounded (``InputBound``): a config or preprocessor that asks for more elements is refused before anything
is allocated, with the fields that asked.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtypelint.dtypes import dtype_name
from dtypelint.errors import LoadError

PREPROCESSOR_FILE = "preprocessor_config.json"

# The most elements one real synthesized input may hold (128 MB of float32): a dtype audit's findings do
# not depend on the input's size, and real models' defaults stay far below it (a 16-frame 224x224 video is
# 2.4M elements, a 2560x1920 document image 15M).
MAX_INPUT_ELEMENTS = 2**25


@dataclass(frozen=True)
class InputBound:
    """How large a synthesized input may be, and the config file its sizes come from (named in the error).
    Fake inputs (``real=False``, meta mode) take no memory: there only what Python itself builds for them
    (the image placeholder tokens) is bounded."""

    max_elements: int = MAX_INPUT_ELEMENTS
    real: bool = True
    config_file: Path | None = None

    @property
    def config_label(self) -> str:
        return str(self.config_file) if self.config_file else "the config"

    @property
    def preprocessor_label(self) -> str:
        return str(self.config_file.with_name(PREPROCESSOR_FILE)) if self.config_file else PREPROCESSOR_FILE

    def check(self, name: str, shape: tuple[int, ...], sized_by: list[tuple[str, str, Any]], *,
              fake_too: bool = False) -> None:
        """Refuse ``shape`` over ``max_elements`` (for real inputs, or with ``fake_too`` for fake ones as
        well); ``sized_by`` is the (file, field, value) of each config value that chose the shape."""
        elements = math.prod(shape)
        if elements <= self.max_elements or not (self.real or fake_too):
            return
        fields = ", ".join(f"{key!r} {_shown(value)} in {file}" for file, key, value in sized_by) or "dtypelint's defaults"
        raise LoadError(f"{name} {list(shape)} would hold {elements} elements, over the bound of {self.max_elements} "
                        f"input elements (raise it with --max-input-elements N): sized by {fields}")


def _shown(value: Any) -> str:
    """A config value in an error line: a list of a million channel means is cut short."""
    text = repr(value)
    if len(text) <= 80:
        return text
    return f"{text[:60]}... ({len(value)} items)" if isinstance(value, (list, tuple, dict)) else f"{text[:80]}..."


@dataclass(frozen=True)
class SynthesizedInput:
    """One input dtypelint made: its keyword, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return f"{self.name} {self.dtype}{list(self.shape)}"


def describe_inputs(inputs: Mapping[str, Any]) -> list[SynthesizedInput]:
    return [SynthesizedInput(name, tuple(value.shape), dtype_name(value.dtype))
            for name, value in inputs.items() if isinstance(value, torch.Tensor)]


def forward_parameters(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def synthesize_inputs(
    model: torch.nn.Module,
    config: Any,
    *,
    batch: int,
    seq_len: int,
    float_dtype: torch.dtype,
    seed: int = 0,
    preprocessor: Mapping[str, Any] | None = None,
    bound: InputBound | None = None,
) -> dict[str, torch.Tensor]:
    """The inputs ``model.forward`` takes that ``config`` can size; ``input_ids`` for a model whose
    signature names no input this knows (the causal-LM default). ``bound`` (default: ``InputBound()``, real
    inputs) says how large each may be; ``batch * seq_len`` is the caller's to bound."""
    bound = bound or InputBound()
    parameters = forward_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    if "pixel_values" in parameters:
        inputs["pixel_values"] = _pixel_values(config, preprocessor or {}, batch, float_dtype, generator, bound)
    if "input_features" in parameters:
        features = _input_features(config, batch, seq_len, float_dtype, generator, bound)
        if features is not None:
            inputs["input_features"] = features
    if "input_values" in parameters:
        values = _input_values(config, batch, seq_len, float_dtype, generator, bound)
        if values is not None:
            inputs["input_values"] = values
    if "input_ids" in parameters or not inputs:
        image_token, image_tokens = _image_tokens(config, batch, seq_len, bound) if "pixel_values" in inputs else (0, 0)
        ids = torch.randint(0, _vocab_size(config), (batch, seq_len), generator=generator)
        eos = getattr(config, "eos_token_id", None)
        if getattr(config, "is_encoder_decoder", False) and isinstance(eos, int):
            ids[:, -1] = eos  # as an encoder-decoder's tokenizer ends the source (T5/BART classifiers need it)
        if image_tokens:
            ids = torch.cat([torch.full((batch, image_tokens), image_token, dtype=torch.long), ids], dim=1)
        length = ids.shape[1]
        inputs["input_ids"] = ids
        inputs["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
        if "position_ids" in parameters:
            inputs["position_ids"] = torch.arange(length).unsqueeze(0).expand(batch, -1)
    if "decoder_input_ids" in parameters and getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = _decoder_input_ids(config, batch, seq_len, generator)
    return inputs


def _sub_value(config: Any, name: str, *subconfigs: str) -> Any:
    """``config.name``, else the first sub-config's (``vision_config.image_size``)."""
    return _sub_field(config, name, *subconfigs)[1]


def _sub_field(config: Any, name: str, *subconfigs: str) -> tuple[str, Any]:
    """``_sub_value`` and the field it came from (``"vision_config.image_size"``)."""
    value = getattr(config, name, None)
    field = name
    for sub in subconfigs:
        if value is not None:
            break
        value, field = getattr(getattr(config, sub, None), name, None), f"{sub}.{name}"
    return field, value


def _vocab_size(config: Any) -> int:
    vocab = _sub_value(config, "vocab_size", "text_config", "decoder")
    return vocab if isinstance(vocab, int) and vocab > 0 else 2


def _side(size: Any) -> tuple[int, int] | None:
    """An image size as ``(height, width)`` from an int, a pair or a preprocessor ``size`` dict."""
    if isinstance(size, bool):
        return None
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            return _side((size["height"], size["width"]))
        return _side(size.get("shortest_edge"))
    return None


# Vision models whose config and preprocessor name no size get this (ViT's and CLIP's 224).
DEFAULT_IMAGE_SIZE = 224


def _pixel_values(config: Any, preprocessor: Mapping[str, Any], batch: int, dtype: torch.dtype,
                  generator: torch.Generator, bound: InputBound) -> torch.Tensor:
    sized_by: list[tuple[str, str, Any]] = []
    field, size = _sub_field(config, "image_size", "vision_config")
    if _side(size):
        sized_by.append((bound.config_label, field, size))
    else:
        key = next((key for key in ("crop_size", "size") if _side(preprocessor.get(key))), None)
        size = preprocessor[key] if key else DEFAULT_IMAGE_SIZE
        sized_by += [(bound.preprocessor_label, key, size)] if key else []
    field, channels = _sub_field(config, "num_channels", "vision_config")
    mean = preprocessor.get("image_mean")
    if isinstance(channels, int) and channels > 0:
        sized_by.append((bound.config_label, field, channels))
    elif isinstance(mean, list) and mean:
        channels = len(mean)
        sized_by.append((bound.preprocessor_label, "image_mean", mean))
    else:
        channels = 3
    field, frames = _sub_field(config, "num_frames", "vision_config")  # video models: (batch, frames, C, H, W)
    clip = (frames,) if isinstance(frames, int) and frames > 0 else ()
    sized_by += [(bound.config_label, field, frames)] if clip else []
    shape = (batch, *clip, channels, *_side(size))
    bound.check("pixel_values", shape, sized_by)
    return torch.randn(shape, generator=generator).to(dtype)


def _image_tokens(config: Any, batch: int, seq_len: int, bound: InputBound) -> tuple[int, int]:
    """The placeholder token an image-text model expects for one image in ``input_ids`` and how many of it:
    ``image_seq_length`` (else one per patch); ``(0, 0)`` for models without an image token. The count is
    bounded in meta mode too: a count past any real input is a broken config there as well."""
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if not isinstance(token, int):
        return 0, 0
    count = getattr(config, "image_seq_length", None)
    if isinstance(count, int):
        sized_by = [(bound.config_label, "image_seq_length", count)]
    else:
        field, size = _sub_field(config, "image_size", "vision_config")
        patch_field, patch = _sub_field(config, "patch_size", "vision_config")
        side = _side(size)
        usable = side and isinstance(patch, int) and patch > 0
        count = (side[0] // patch) * (side[1] // patch) if usable else 1
        sized_by = [(bound.config_label, field, size), (bound.config_label, patch_field, patch)] if usable else []
    bound.check("the image placeholder tokens of input_ids", (count,), sized_by, fake_too=True)
    bound.check("input_ids", (batch, count + seq_len), sized_by)
    return token, max(count, 0)


def _input_features(config: Any, batch: int, seq_len: int, dtype: torch.dtype, generator: torch.Generator,
                    bound: InputBound) -> torch.Tensor | None:
    """Log-mel features: Whisper's ``(batch, num_mel_bins, 2 * max_source_positions)`` (its two convs
    halve the frames once), Speech2Text's ``(batch, frames, input_feat_per_channel * input_channels)``."""
    file = bound.config_label
    mel_bins = getattr(config, "num_mel_bins", None)
    if isinstance(mel_bins, int):
        positions = getattr(config, "max_source_positions", None)
        frames = 2 * positions if isinstance(positions, int) else 4 * seq_len
        sized_by = [(file, "num_mel_bins", mel_bins)]
        if isinstance(positions, int):
            sized_by.append((file, "max_source_positions", positions))
        shape = (batch, mel_bins, frames)
    else:
        per_channel_field = "input_feat_per_channel" if getattr(config, "input_feat_per_channel", None) else "feature_size"
        per_channel = getattr(config, per_channel_field, None)
        if not isinstance(per_channel, int):
            return None
        channels = getattr(config, "input_channels", None) or 1
        sized_by = [(file, per_channel_field, per_channel), (file, "input_channels", channels)]
        shape = (batch, 4 * seq_len, per_channel * channels)
    bound.check("input_features", shape, sized_by)
    return torch.randn(shape, generator=generator).to(dtype)


# Audio heads convolve over frames (x-vector TDNNs span 15): shorter samples than this cannot run.
MIN_AUDIO_FRAMES = 32


def _input_values(config: Any, batch: int, seq_len: int, dtype: torch.dtype, generator: torch.Generator,
                  bound: InputBound) -> torch.Tensor | None:
    """Raw audio for a convolutional feature encoder (wav2vec2-like): ``seq_len`` frames of its stride, at
    least ``MIN_AUDIO_FRAMES``."""
    strides = getattr(config, "conv_stride", None)
    if not (isinstance(strides, (list, tuple)) and strides):
        return None
    kernels = getattr(config, "conv_kernel", None) or [1]
    shape = (batch, math.prod(strides) * max(seq_len, MIN_AUDIO_FRAMES) + max(kernels))
    bound.check("input_values", shape, [(bound.config_label, "conv_stride", list(strides)),
                                        (bound.config_label, "conv_kernel", list(kernels))])
    return torch.randn(shape, generator=generator).to(dtype)


def _decoder_input_ids(config: Any, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """The decoder's start token, then random tokens: ``seq_len`` long, at most its ``max_target_positions``."""
    start = next((value for value in (getattr(config, name, None) for name in
                                      ("decoder_start_token_id", "pad_token_id", "bos_token_id"))
                  if isinstance(value, int)), 0)
    limit = getattr(config, "max_target_positions", None)
    length = min(seq_len, limit) if isinstance(limit, int) and limit > 0 else seq_len
    vocab = getattr(getattr(config, "decoder", None), "vocab_size", None) or _vocab_size(config)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    ids[:, 0] = start
    return ids
