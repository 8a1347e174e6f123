"""Sample inputs for a transformers model, per modality, made from its config and its own forward signature.

Each input the forward takes and the config can size is made: token ids and their mask (text),
``decoder_input_ids`` from ``decoder_start_token_id`` (encoder-decoders), ``pixel_values`` (vision; size
and channels from the config, its ``vision_config`` or the ``preprocessor_config.json`` beside the
checkpoint), ``input_features`` (log-mel spectrograms) or ``input_values`` (raw audio) for speech, and
both towers' inputs for dual encoders (CLIP-like). Float inputs get ``float_dtype``: the compute dtype, the
way a pipeline casts them, or another dtype to audit a pipeline that forgets the cast.

Made inside a ``FakeTensorMode``, the inputs are fake too: shapes and dtypes, no memory.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dtypelint.dtypes import dtype_name


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
) -> dict[str, torch.Tensor]:
    """The inputs ``model.forward`` takes that ``config`` can size; ``input_ids`` for a model whose
    signature names no input this knows (the causal-LM default)."""
    parameters = forward_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    if "pixel_values" in parameters:
        inputs["pixel_values"] = _pixel_values(config, preprocessor or {}, batch, float_dtype, generator)
    if "input_features" in parameters:
        features = _input_features(config, batch, seq_len, float_dtype, generator)
        if features is not None:
            inputs["input_features"] = features
    if "input_values" in parameters:
        values = _input_values(config, batch, seq_len, float_dtype, generator)
        if values is not None:
            inputs["input_values"] = values
    if "input_ids" in parameters or not inputs:
        image_tokens = _image_tokens(config) if "pixel_values" in inputs else []
        ids = torch.randint(0, _vocab_size(config), (batch, seq_len), generator=generator)
        eos = getattr(config, "eos_token_id", None)
        if getattr(config, "is_encoder_decoder", False) and isinstance(eos, int):
            ids[:, -1] = eos  # as an encoder-decoder's tokenizer ends the source (T5/BART classifiers need it)
        if image_tokens:
            ids = torch.cat([torch.tensor(image_tokens, dtype=torch.long).expand(batch, -1), ids], dim=1)
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
    value = getattr(config, name, None)
    for sub in subconfigs:
        if value is not None:
            break
        value = getattr(getattr(config, sub, None), name, None)
    return value


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
                  generator: torch.Generator) -> torch.Tensor:
    height_width = (_side(_sub_value(config, "image_size", "vision_config"))
                    or _side(preprocessor.get("crop_size")) or _side(preprocessor.get("size"))
                    or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))
    channels = _sub_value(config, "num_channels", "vision_config")
    if not isinstance(channels, int) or channels <= 0:
        mean = preprocessor.get("image_mean")
        channels = len(mean) if isinstance(mean, list) and mean else 3
    frames = _sub_value(config, "num_frames", "vision_config")  # video models: (batch, frames, C, H, W)
    clip = (frames,) if isinstance(frames, int) and frames > 0 else ()
    return torch.randn(batch, *clip, channels, *height_width, generator=generator).to(dtype)


def _image_tokens(config: Any) -> list[int]:
    """The placeholder tokens an image-text model expects for one image in ``input_ids``: its image token
    repeated ``image_seq_length`` times (else one per patch); none for models without an image token."""
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if not isinstance(token, int):
        return []
    count = getattr(config, "image_seq_length", None)
    if not isinstance(count, int):
        side = _side(_sub_value(config, "image_size", "vision_config"))
        patch = _sub_value(config, "patch_size", "vision_config")
        count = (side[0] // patch) * (side[1] // patch) if side and isinstance(patch, int) and patch > 0 else 1
    return [token] * count


def _input_features(config: Any, batch: int, seq_len: int, dtype: torch.dtype,
                    generator: torch.Generator) -> torch.Tensor | None:
    """Log-mel features: Whisper's ``(batch, num_mel_bins, 2 * max_source_positions)`` (its two convs
    halve the frames once), Speech2Text's ``(batch, frames, input_feat_per_channel * input_channels)``."""
    mel_bins = getattr(config, "num_mel_bins", None)
    if isinstance(mel_bins, int):
        positions = getattr(config, "max_source_positions", None)
        frames = 2 * positions if isinstance(positions, int) else 4 * seq_len
        return torch.randn(batch, mel_bins, frames, generator=generator).to(dtype)
    per_channel = getattr(config, "input_feat_per_channel", None) or getattr(config, "feature_size", None)
    if isinstance(per_channel, int):
        channels = getattr(config, "input_channels", None) or 1
        return torch.randn(batch, 4 * seq_len, per_channel * channels, generator=generator).to(dtype)
    return None


# Audio heads convolve over frames (x-vector TDNNs span 15): shorter samples than this cannot run.
MIN_AUDIO_FRAMES = 32


def _input_values(config: Any, batch: int, seq_len: int, dtype: torch.dtype,
                  generator: torch.Generator) -> torch.Tensor | None:
    """Raw audio for a convolutional feature encoder (wav2vec2-like): ``seq_len`` frames of its stride, at
    least ``MIN_AUDIO_FRAMES``."""
    strides = getattr(config, "conv_stride", None)
    if not (isinstance(strides, (list, tuple)) and strides):
        return None
    kernels = getattr(config, "conv_kernel", None) or [1]
    samples = math.prod(strides) * max(seq_len, MIN_AUDIO_FRAMES) + max(kernels)
    return torch.randn(batch, samples, generator=generator).to(dtype)


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
