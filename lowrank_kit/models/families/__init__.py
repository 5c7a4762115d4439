"""The built-in model families: one file per family, each with its adapter, tiny config and tiny inputs:
the VLMs, and the text-only decoders of their language models (``llama``, ``qwen2``, ``qwen3``; their
shared pieces are in :mod:`~lowrank_kit.models.families.text`).

Module paths are those of transformers 5.x (checked by building each family's tiny model in
``tests/models``). What several families share (reading a config, the chat-template inputs, the tiny
vocabulary) is in :mod:`~lowrank_kit.models.families.common`. Each family module lists its adapters in
``ADAPTERS``; the built-in plugin registers them in the order below.
"""

from __future__ import annotations

from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.models.families import (
    llama,
    llava,
    llava_next,
    molmo,
    molmo2,
    qwen2,
    qwen2_vl,
    qwen3,
    smolvlm,
)

# The VLM families, then the text decoders their language models are built on.
_FAMILY_MODULES = (llava, llava_next, smolvlm, qwen2_vl, molmo2, molmo, llama, qwen2, qwen3)

ADAPTERS: tuple[ModelAdapter, ...] = tuple(a for module in _FAMILY_MODULES for a in module.ADAPTERS)

__all__ = ["ADAPTERS"]
