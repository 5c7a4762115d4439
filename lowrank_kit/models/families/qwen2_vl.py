"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT with a patch merger, a Qwen2 decoder with M-RoPE.

The two share everything but the vision tower's class: the decoder, the q/k/v biases, the vision tokens
and the processor-free inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

from lowrank_kit.models.base import AttentionInfo, ModelAdapter
from lowrank_kit.models.families.common import (
    TINY_IMAGE_TOKEN,
    TINY_VIDEO_TOKEN,
    TINY_VISION_END,
    TINY_VISION_START,
    chat_template_inputs,
    decoder_paths,
    random_pixels,
    tiny_text,
    wrap_image_block,
)
from lowrank_kit.models.families.qwen2 import qwen2_attention_info


def qwen2_vl_attention_info(config: Any) -> AttentionInfo:
    """The Qwen2 decoder's geometry (q/k/v bias); its RoPE carries the M-RoPE sections."""
    return qwen2_attention_info(config)


# -- tiny configs and inputs -----------------------------------------------------------------------------
def _tiny_qwen_text() -> dict[str, Any]:
    # mrope_section splits head_dim / 2 = 8 rotary frequencies over (time, height, width).
    text = tiny_text(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    )
    del text["head_dim"]  # Qwen2-VL derives head_dim = hidden // heads = 16
    return text


def _tiny_qwen_tokens() -> dict[str, int]:
    return {
        "image_token_id": TINY_IMAGE_TOKEN,
        "video_token_id": TINY_VIDEO_TOKEN,
        "vision_start_token_id": TINY_VISION_START,
        "vision_end_token_id": TINY_VISION_END,
    }


def tiny_qwen2_vl_config() -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config=_tiny_qwen_text(),
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        tie_word_embeddings=False,
        **_tiny_qwen_tokens(),
    )


def tiny_qwen2_5_vl_config() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=_tiny_qwen_text(),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        tie_word_embeddings=False,
        **_tiny_qwen_tokens(),
    )


def tiny_qwen_vl_inputs(config: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    vision = config.vision_config
    merge = vision.spatial_merge_size
    grid = (1, 2 * merge, 2 * merge)  # one frame of 2×2 merged tokens, each from merge×merge patches
    n_patches = grid[0] * grid[1] * grid[2]
    n_tokens = n_patches // merge**2
    block = torch.tensor(
        [config.vision_start_token_id] + [config.image_token_id] * n_tokens + [config.vision_end_token_id]
    )
    ids = wrap_image_block(gen, batch, block)
    channels = getattr(vision, "in_channels", None) or vision.in_chans
    patch_dim = channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = random_pixels(gen, (batch * n_patches, patch_dim), dtype)
    return {
        "input_ids": ids,
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([grid] * batch),
        # M-RoPE gives image tokens 3-D positions; this marks which tokens they are (1 = image).
        "mm_token_type_ids": (ids == config.image_token_id).long(),
    }


# -- the adapters ----------------------------------------------------------------------------------------
_TEXT = "model.language_model"

qwen2_vl = ModelAdapter(
    name="qwen2_vl",
    display_name="Qwen2-VL",
    model_class="Qwen2VLForConditionalGeneration",
    model_types=("qwen2_vl",),
    **decoder_paths(_TEXT),
    vision_tower="model.visual",
    projector="model.visual.merger",
    attention_info=qwen2_vl_attention_info,
    build_inputs=chat_template_inputs,
    tiny_config=tiny_qwen2_vl_config,
    tiny_inputs=tiny_qwen_vl_inputs,
    description="Qwen2-VL: native-resolution ViT with patch merger, Qwen2 decoder with M-RoPE and q/k/v bias",
)

qwen2_5_vl = ModelAdapter(
    name="qwen2_5_vl",
    display_name="Qwen2.5-VL",
    model_class="Qwen2_5_VLForConditionalGeneration",
    model_types=("qwen2_5_vl",),
    **decoder_paths(_TEXT),
    vision_tower="model.visual",
    projector="model.visual.merger",
    attention_info=qwen2_vl_attention_info,
    build_inputs=chat_template_inputs,
    tiny_config=tiny_qwen2_5_vl_config,
    tiny_inputs=tiny_qwen_vl_inputs,
    description="Qwen2.5-VL: windowed-attention ViT, Qwen2 decoder with M-RoPE and q/k/v bias",
)

ADAPTERS = (qwen2_vl, qwen2_5_vl)
