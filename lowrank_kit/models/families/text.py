"""What the text-only decoders share: their structure (no vision side), prompts through the tokenizer's
chat template, and processor-free tiny inputs.

A text decoder's adapter points at ``model.layers`` of a ``...ForCausalLM``; ``vision_tower`` and
``projector`` are empty, which is how the rest of lowrank_kit tells a language model from a VLM
(:attr:`~lowrank_kit.models.base.ModelAdapter.text_only`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lowrank_kit.errors import ModelLoadError
from lowrank_kit.models.families.common import ROLES, decoder_paths, random_text_ids

TINY_PROMPT = 12


def text_chat_inputs(tokenizer: Any, images: Sequence[Any], messages: Sequence[dict[str, str]]) -> dict:
    """Model inputs for a chat through the tokenizer's own chat template (a text model takes no image)."""
    if images:
        raise ModelLoadError(f"a text-only language model takes no images, got {len(images)}")
    if tokenizer is None:
        raise ModelLoadError(
            "this model has no tokenizer (random weights, or a directory without tokenizer files); load it "
            "from a checkpoint that ships its tokenizer"
        )
    if not messages:
        raise ValueError("build_inputs needs at least one message")
    for turn in messages:
        if turn.get("role") not in ROLES:
            raise ValueError(f"message role {turn.get('role')!r} is not one of {', '.join(ROLES)}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelLoadError(
            f"the tokenizer {type(tokenizer).__name__} has no chat template; use an instruct checkpoint "
            "whose tokenizer ships one"
        )
    batch = tokenizer.apply_chat_template(
        [{"role": t["role"], "content": str(t.get("content", ""))} for t in messages],
        add_generation_prompt=messages[-1]["role"] != "assistant",
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    return {k: v for k, v in dict(batch).items() if isinstance(v, torch.Tensor)}


def tiny_text_inputs(config: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    """A batch of random text prompts for a tiny text decoder (``dtype`` is unused: no pixels)."""
    return {"input_ids": random_text_ids(gen, batch, TINY_PROMPT)}


def causal_lm_paths() -> dict[str, str]:
    """The module paths every ``...ForCausalLM`` of the Llama lineage shares (no vision side)."""
    return {**decoder_paths("model"), "vision_tower": "", "projector": ""}
