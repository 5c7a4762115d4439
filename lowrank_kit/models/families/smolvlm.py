"""SmolVLM / Idefics3: a SigLIP tower, a pixel-shuffle connector and a SmolLM (Llama) decoder."""

from __future__ import annotations

from typing import Any

import torch
from transformers import SmolVLMConfig

from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.models.families.common import (
    TINY_IMAGE_TOKEN,
    TINY_PAD,
    chat_template_inputs,
    decoder_paths,
    llama_attention_info,
    random_pixels,
    tiny_text,
    wrap_image_block,
)


def tiny_smolvlm_config() -> SmolVLMConfig:
    return SmolVLMConfig(
        text_config={"model_type": "llama", **tiny_text()},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
        },
        image_token_id=TINY_IMAGE_TOKEN,
        scale_factor=2,
        pad_token_id=TINY_PAD,
        tie_word_embeddings=False,
    )


def tiny_smolvlm_inputs(config: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    vision = config.vision_config
    size = vision.image_size
    n_tokens = (size // vision.patch_size) ** 2 // config.scale_factor**2
    ids = wrap_image_block(gen, batch, torch.full((n_tokens,), config.image_token_id))
    pixels = random_pixels(gen, (batch, 1, 3, size, size), dtype)
    mask = torch.ones((batch, 1, size, size), dtype=torch.bool)
    return {"input_ids": ids, "pixel_values": pixels, "pixel_attention_mask": mask}


_TEXT = "model.text_model"

smolvlm = ModelAdapter(
    name="smolvlm",
    display_name="SmolVLM",
    model_class="SmolVLMForConditionalGeneration",
    # HuggingFaceTB/SmolVLM-Instruct is saved as Idefics3ForConditionalGeneration, the same layout.
    model_types=("smolvlm", "idefics3"),
    **decoder_paths(_TEXT),
    vision_tower="model.vision_model",
    projector="model.connector",
    attention_info=llama_attention_info,
    build_inputs=chat_template_inputs,
    tiny_config=tiny_smolvlm_config,
    tiny_inputs=tiny_smolvlm_inputs,
    description="SmolVLM / Idefics3: SigLIP tower, pixel-shuffle connector, SmolLM (Llama) decoder",
)

ADAPTERS = (smolvlm,)
