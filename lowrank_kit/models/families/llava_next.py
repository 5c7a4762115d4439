"""LLaVA-NeXT (1.6): LLaVA with any-resolution image tiles and a Llama-family decoder."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlavaNextConfig

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


def tiny_llava_next_config() -> LlavaNextConfig:
    return LlavaNextConfig(
        text_config={"model_type": "llama", **tiny_text()},
        vision_config=tiny_clip_vision(8),
        image_token_id=TINY_IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[8, 8], [8, 16], [16, 8]],
        image_seq_length=4,
        pad_token_id=TINY_PAD,
        tie_word_embeddings=False,
    )


def tiny_llava_next_inputs(config: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    vision = config.vision_config
    size = vision.image_size
    if [size, size] not in [list(p) for p in config.image_grid_pinpoints]:
        raise ValueError(
            f"tiny LLaVA-NeXT inputs use one {size}x{size} tile, but image_grid_pinpoints "
            f"{config.image_grid_pinpoints} has no [{size}, {size}]"
        )
    side = size // vision.patch_size
    # An image of exactly one tile: the base view (side² features) plus the tile's side×side features
    # with one newline feature per row; nothing to unpad because the aspect ratio is 1.
    n_tokens = side * side + side * (side + 1)
    ids = wrap_image_block(gen, batch, torch.full((n_tokens,), config.image_token_id))
    pixels = random_pixels(gen, (batch, 2, 3, size, size), dtype)
    sizes = torch.tensor([[size, size]] * batch)
    return {"input_ids": ids, "pixel_values": pixels, "image_sizes": sizes}


_TEXT = "model.language_model"

llava_next = ModelAdapter(
    name="llava_next",
    display_name="LLaVA-NeXT (1.6)",
    model_class="LlavaNextForConditionalGeneration",
    model_types=("llava_next",),
    **decoder_paths(_TEXT),
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    attention_info=llama_attention_info,
    build_inputs=chat_template_inputs,
    tiny_config=tiny_llava_next_config,
    tiny_inputs=tiny_llava_next_inputs,
    description="LLaVA-NeXT: LLaVA with any-resolution image tiles (image_sizes) and a Llama-family decoder",
)

ADAPTERS = (llava_next,)
