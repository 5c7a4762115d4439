"""LLaVA-1.5: a CLIP tower, a 2-layer MLP projector and a Vicuna (Llama) decoder."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlavaConfig

from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.models.families.common import (
    TINY_IMAGE_TOKEN,
    TINY_PAD,
    chat_template_inputs,
    decoder_paths,
    llama_attention_info,
    random_pixels,
    tiny_clip_vision,
    tiny_text,
    wrap_image_block,
)


def tiny_llava_config() -> LlavaConfig:
    return LlavaConfig(
        text_config={"model_type": "llama", **tiny_text()},
        vision_config=tiny_clip_vision(8),
        image_token_id=TINY_IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=4,
        pad_token_id=TINY_PAD,
        tie_word_embeddings=False,
    )


def tiny_llava_inputs(config: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    # The "default" strategy drops the CLS token; "full" keeps it.
    n_tokens = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    ids = wrap_image_block(gen, batch, torch.full((n_tokens,), config.image_token_id))
    pixels = random_pixels(gen, (batch, 3, vision.image_size, vision.image_size), dtype)
    return {"input_ids": ids, "pixel_values": pixels}


_TEXT = "model.language_model"

llava = ModelAdapter(
    name="llava",
    display_name="LLaVA-1.5",
    model_class="LlavaForConditionalGeneration",
    model_types=("llava",),
    **decoder_paths(_TEXT),
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    attention_info=llama_attention_info,
    build_inputs=chat_template_inputs,
    tiny_config=tiny_llava_config,
    tiny_inputs=tiny_llava_inputs,
    description="LLaVA-1.5: CLIP ViT-L/14-336 + 2-layer MLP projector + Vicuna (Llama) decoder",
)

ADAPTERS = (llava,)
