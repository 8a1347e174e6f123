"""Which transformers class a checkpoint or config holds: the one ``config.architectures`` names (what
``save_pretrained`` recorded), else the first task mapping of transformers (``MODEL_FOR_*_MAPPING_NAMES``)
that has a class for the config's ``model_type``, or the class the user names (``--model-class``).

A class is looked up by name on the top-level ``transformers`` module and must be a ``PreTrainedModel``
whose ``config_class`` fits the config: never a substitute. A checkpoint with remote code (``auto_map``,
with ``trust_remote_code``) is built through the Auto class its ``auto_map`` lists for that name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dtypelint.errors import LoadError, UsageError

# Task mappings in the order they are tried for a config without ``architectures``; causal LM first, as
# before this module existed. Each is a ``MODEL_FOR_<TASK>_MAPPING_NAMES`` of transformers; the task
# family is what the README's sweep table groups by.
TASK_FAMILIES: dict[str, str] = {
    "CAUSAL_LM": "text generation",
    "SEQ_TO_SEQ_CAUSAL_LM": "encoder-decoder",
    "SPEECH_SEQ_2_SEQ": "speech",
    "CTC": "speech",
    "AUDIO_CLASSIFICATION": "speech",
    "AUDIO_FRAME_CLASSIFICATION": "speech",
    "AUDIO_XVECTOR": "speech",
    "TEXT_TO_SPECTROGRAM": "speech",
    "TEXT_TO_WAVEFORM": "speech",
    "RNNT": "speech",
    "TDT": "speech",
    "MASKED_LM": "text encoder",
    "SEQUENCE_CLASSIFICATION": "text encoder",
    "TOKEN_CLASSIFICATION": "text encoder",
    "QUESTION_ANSWERING": "text encoder",
    "MULTIPLE_CHOICE": "text encoder",
    "NEXT_SENTENCE_PREDICTION": "text encoder",
    "PRETRAINING": "text encoder",
    "TEXT_ENCODING": "text encoder",
    "TABLE_QUESTION_ANSWERING": "text encoder",
    "IMAGE_CLASSIFICATION": "vision",
    "IMAGE": "vision",
    "BACKBONE": "vision",
    "MASKED_IMAGE_MODELING": "vision",
    "CAUSAL_IMAGE_MODELING": "vision",
    "DEPTH_ESTIMATION": "vision",
    "SEMANTIC_SEGMENTATION": "vision",
    "INSTANCE_SEGMENTATION": "vision",
    "UNIVERSAL_SEGMENTATION": "vision",
    "IMAGE_SEGMENTATION": "vision",
    "OBJECT_DETECTION": "vision",
    "IMAGE_TO_IMAGE": "vision",
    "VIDEO_CLASSIFICATION": "vision",
    "MASK_GENERATION": "vision",
    "KEYPOINT_DETECTION": "vision",
    "KEYPOINT_MATCHING": "vision",
    "POSE_ESTIMATION": "vision",
    "NORMAL_ESTIMATION": "vision",
    "POINTMAP_ESTIMATION": "vision",
    "IMAGE_MATTING": "vision",
    "TEXT_RECOGNITION": "vision",
    "TABLE_RECOGNITION": "vision",
    "ZERO_SHOT_IMAGE_CLASSIFICATION": "multimodal",
    "ZERO_SHOT_OBJECT_DETECTION": "multimodal",
    "IMAGE_TEXT_TO_TEXT": "multimodal",
    "VISION_2_SEQ": "multimodal",
    "MULTIMODAL_LM": "multimodal",
    "VISUAL_QUESTION_ANSWERING": "multimodal",
    "DOCUMENT_QUESTION_ANSWERING": "multimodal",
    "RETRIEVAL": "multimodal",
    "TIME_SERIES_CLASSIFICATION": "other",
    "TIME_SERIES_REGRESSION": "other",
    "TIME_SERIES_PREDICTION": "other",
    "DECISION": "other",
    "": "base model",  # MODEL_MAPPING_NAMES: the bare model, last resort
}


def task_mappings() -> dict[str, dict[str, Any]]:
    """The installed transformers' task mappings (``model_type -> class name``) by task, in the order of
    ``TASK_FAMILIES`` and then any other the version has."""
    from transformers.models.auto import modeling_auto

    found = {name[len("MODEL_"):-len("_MAPPING_NAMES")].removeprefix("FOR_"): getattr(modeling_auto, name)
             for name in dir(modeling_auto) if name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES")}
    ordered = {task: found[task] for task in TASK_FAMILIES if task in found}
    return {**ordered, **{task: mapping for task, mapping in found.items() if task not in ordered}}


def task_family(task: str) -> str:
    return TASK_FAMILIES.get(task, "other")


@dataclass(frozen=True)
class ModelClass:
    """The class to build: ``name`` as the report shows it; ``builder`` has ``from_pretrained`` and
    ``_from_config``/``from_config`` (the class itself, or an Auto class for remote code); ``source`` says
    where the name came from (``architectures``, a task mapping, ``--model-class``)."""

    name: str
    builder: Any
    source: str

    def kind(self) -> str:
        """``a causal LM`` or ``a model``: for error messages."""
        return "a causal LM" if self.name in _class_names(task_mappings().get("CAUSAL_LM", {})) else "a model"


def _class_names(mapping: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def resolve_model_class(config: Any, override: str | None = None, *, trust_remote_code: bool = False) -> ModelClass:
    """The class to audit for ``config``: ``override`` (``--model-class``), else the first name of
    ``config.architectures``, else the first task mapping with a class for its ``model_type``. A name that
    does not fit is an error (exit 2), never a substitute."""
    if override is not None:
        return ModelClass(override, named_class(override, config, what="--model-class"), "--model-class")
    architectures = getattr(config, "architectures", None) or []
    if trust_remote_code and not architectures and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        import transformers

        return ModelClass("AutoModelForCausalLM", transformers.AutoModelForCausalLM, "auto_map")
    if architectures:
        name = architectures[0]
        remote = _remote_builder(config, name) if trust_remote_code else None
        if remote is not None:
            return ModelClass(name, remote, "auto_map")
        return ModelClass(name, named_class(name, config, what="config.architectures names"),
                          "config.architectures")
    model_type = getattr(config, "model_type", None)
    for task, mapping in task_mappings().items():
        name = mapping.get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0] if name else None
        if name and _fits(_lookup(name), config):
            return ModelClass(name, _lookup(name), f"MODEL_FOR_{task}_MAPPING_NAMES" if task else "MODEL_MAPPING_NAMES")
    raise LoadError(f"no model class for model_type {model_type!r}: the config names no architectures and no task "
                    f"mapping of this transformers has one; name one with --model-class")


def named_class(name: str, config: Any, *, what: str) -> Any:
    """The ``transformers`` class called ``name``, checked against ``config``."""
    cls = _lookup(name)
    if cls is None:
        error = UsageError if what == "--model-class" else LoadError
        raise error(f"{what} {name}, which this transformers does not have")
    from transformers import PreTrainedModel

    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise UsageError(f"{what} {name}, which is not a transformers model class (PreTrainedModel)")
    if not _fits(cls, config):
        raise UsageError(f"{what} {name}, whose config class {cls.config_class.__name__} does not fit the config "
                         f"({type(config).__name__})")
    return cls


def _lookup(name: str) -> Any:
    import transformers

    try:
        return getattr(transformers, name, None)
    except Exception:  # noqa: BLE001 - transformers' lazy module raises when a class's backend is missing
        return None


def _fits(cls: Any, config: Any) -> bool:
    from transformers import PreTrainedModel

    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        return False
    config_class = getattr(cls, "config_class", None)
    if config_class is None or isinstance(config, config_class):
        return True
    # transformers' own rule besides: an Auto mapping that builds this class for the config's model_type
    # (transformers 5 maps ``exaone`` to ``LlamaForCausalLM``, which it builds with the ExaoneConfig).
    model_type = getattr(config, "model_type", None)
    return any(cls.__name__ in _class_names({model_type: mapping[model_type]})
               for mapping in task_mappings().values() if model_type in mapping)


def _remote_builder(config: Any, name: str) -> Any:
    """The Auto class whose ``auto_map`` entry builds ``name`` with the checkpoint's own code."""
    import transformers

    for auto_name, reference in (getattr(config, "auto_map", None) or {}).items():
        references = reference if isinstance(reference, (list, tuple)) else [reference]
        if auto_name.startswith("AutoModel") and any(str(ref).rsplit(".", 1)[-1] == name for ref in references):
            return getattr(transformers, auto_name, None)
    return None
