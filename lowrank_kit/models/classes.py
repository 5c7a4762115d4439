"""Which transformers class builds a config: the one piece of model lookup that needs transformers itself."""

from __future__ import annotations

from typing import Any

import transformers
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from lowrank_kit.errors import ModelLoadError
from lowrank_kit.models.base import config_identity


def model_class_for(config: Any) -> type:
    """The transformers class that builds ``config``: the ``...ForConditionalGeneration`` of a VLM, the
    ``...ForCausalLM`` of a text decoder."""
    model_type, archs = config_identity(config)
    name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(
        model_type
    ) or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None or not hasattr(transformers, name):
        wanted = name or (archs[0] if archs else f"a model for model_type {model_type!r}")
        raise ModelLoadError(
            f"{wanted} is not in transformers {transformers.__version__}; upgrade transformers to load it"
        )
    return getattr(transformers, name)
