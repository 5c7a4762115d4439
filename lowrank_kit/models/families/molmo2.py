"""Molmo2: a SigLIP tower, an attention-pooling adapter and a Qwen3/OLMo decoder with QK-norm.

On a transformers without Molmo2 the family stays registered; its tiny config is then an error that says
to upgrade.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import transformers

from lowrank_kit.errors import ModelLoadError
from lowrank_kit.models.base import AttentionInfo, ModelAdapter, QKNormKind, RopeInfo
from lowrank_kit.models.families.common import (
    TINY_VOCAB,
    attention_geometry,
    chat_template_inputs,
    decoder_paths,
    llama_bias,
    random_pixels,
    rope_info,
    text_config,
    tiny_text,
    wrap_image_block,
)

# Molmo2 keeps its image tokens in an extra embedding block after the vocabulary, as the real
# checkpoints do (ids 151936.. for a 151936-token vocabulary); the LM head cannot emit them.
TINY_MOLMO2_EXTRA_VOCAB = 8
TINY_MOLMO2_IMAGE_START = TINY_VOCAB
TINY_MOLMO2_IMAGE_END = TINY_VOCAB + 1
TINY_MOLMO2_IMAGE_PATCH = TINY_VOCAB + 2
TINY_MOLMO2_LOW_RES_START = TINY_VOCAB + 3
TINY_MOLMO2_FRAME_START = TINY_VOCAB + 4
TINY_MOLMO2_FRAME_END = TINY_VOCAB + 5

_QK_NORM_KINDS: dict[str, QKNormKind] = {"qwen3": "per_head", "olmo": "full"}


# -- reading a config ----------------------------------------------------------------------------------
def _molmo2_qk_norm(text: Any) -> QKNormKind:
    kind = getattr(text, "qk_norm_type", None)
    if kind not in _QK_NORM_KINDS:
        raise ModelLoadError(
            f"Molmo2 config has qk_norm_type {kind!r}; supported: {', '.join(sorted(_QK_NORM_KINDS))}"
        )
    return _QK_NORM_KINDS[kind]


def _molmo2_rope(text: Any) -> RopeInfo:
    info = rope_info(text)
    scaled = getattr(text, "rope_scaling_layers", None)
    layers = list(range(int(text.num_hidden_layers)))
    if (
        info.parameters.get("rope_type", "default") != "default"
        and scaled is not None
        and list(scaled) != layers
    ):
        # Molmo2 applies the scaled RoPE only on these layers and plain RoPE (same theta) on the rest.
        return RopeInfo(info.kind, info.theta, {**info.parameters, "rope_scaling_layers": list(scaled)})
    return info


def molmo2_attention_info(config: Any) -> AttentionInfo:
    return attention_geometry(config, qkv_bias=llama_bias, qk_norm=_molmo2_qk_norm, rope=_molmo2_rope)


def molmo2_missing_message() -> str:
    return (
        f"model family molmo2 needs transformers.Molmo2ForConditionalGeneration, which transformers "
        f"{transformers.__version__} lacks; upgrade transformers (5.23 has it)"
    )


@functools.cache
def molmo2_pooling_per_image() -> bool:
    """Whether the installed transformers' Molmo2 takes ``image_token_pooling`` per image.

    Up to transformers 5.23 the processor emitted indices into the flattened patches of the whole
    batch; from 5.25 each image's indices address only its own patches and the model adds the
    offsets itself (from ``image_num_crops``). Inputs built or batched outside the processor (the
    tiny models, :mod:`lowrank_kit.eval.batching`) follow whichever the installed model expects. Read
    from the model's own code: the offsetting step is what changed.
    """
    # Imported here: transformers before 5.23 has no molmo2 module.
    from transformers.models.molmo2 import modeling_molmo2

    source = inspect.getsource(modeling_molmo2.Molmo2Model.get_image_features)
    return "image_num_crops" in source and "offsets" in source


# -- tiny config and inputs ------------------------------------------------------------------------------
def tiny_molmo2_config():
    if not hasattr(transformers, "Molmo2Config"):
        raise ModelLoadError(molmo2_missing_message())
    text = tiny_text(
        additional_vocab_size=TINY_MOLMO2_EXTRA_VOCAB,
        qk_norm_type="qwen3",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return transformers.Molmo2Config(
        text_config=text,
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "image_size": [16, 16],
            "patch_size": 4,
        },
        adapter_config={
            "vision_feature_layer": [-1, -2],
            "hidden_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 64,
            "text_hidden_size": 64,
        },
        image_start_token_id=TINY_MOLMO2_IMAGE_START,
        image_end_token_id=TINY_MOLMO2_IMAGE_END,
        image_patch_id=TINY_MOLMO2_IMAGE_PATCH,
        low_res_image_start_token_id=TINY_MOLMO2_LOW_RES_START,
        frame_start_token_id=TINY_MOLMO2_FRAME_START,
        frame_end_token_id=TINY_MOLMO2_FRAME_END,
        tie_word_embeddings=False,
    )


def tiny_molmo2_inputs(config: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    vision = config.vision_config
    rows, cols = (s // vision.patch_size for s in vision.image_size)
    n_patches = rows * cols
    per_image = molmo2_pooling_per_image()
    # One crop per image; each image token attention-pools a 2×2 block of that crop's patches.
    pool = []
    for r in range(0, rows - 1, 2):
        for c in range(0, cols - 1, 2):
            pool.append([r * cols + c, r * cols + c + 1, (r + 1) * cols + c, (r + 1) * cols + c + 1])
    pool_t = torch.tensor(pool)
    n_tokens = len(pool)
    block = torch.tensor(
        [config.image_start_token_id] + [config.image_patch_id] * n_tokens + [config.image_end_token_id]
    )
    ids = wrap_image_block(gen, batch, block)
    patch_dim = vision.num_channels * vision.patch_size**2
    return {
        "input_ids": ids,
        "pixel_values": random_pixels(gen, (batch, n_patches, patch_dim), dtype),
        # Pooling indices address each image's own crops (transformers >= 5.25) or the crops of the
        # whole batch, flattened (earlier): whichever the installed model expects.
        "image_token_pooling": torch.cat(
            [pool_t if per_image else pool_t + i * n_patches for i in range(batch)]
        ),
        # [low-res rows, low-res cols, high-res rows, high-res cols]: all tokens in the first grid.
        "image_grids": torch.tensor([[rows // 2, cols // 2, 0, 0]] * batch),
        "image_num_crops": torch.ones(batch, dtype=torch.long),
        "mm_token_type_ids": (ids == config.image_patch_id).long(),
    }


# -- the adapter ---------------------------------------------------------------------------------------
_TEXT = "model.language_model"

molmo2 = ModelAdapter(
    name="molmo2",
    display_name="Molmo2",
    model_class="Molmo2ForConditionalGeneration",
    model_types=("molmo2",),
    **decoder_paths(_TEXT),
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    attention_info=molmo2_attention_info,
    norm_after=lambda config: bool(getattr(text_config(config), "norm_after", False)),
    build_inputs=chat_template_inputs,
    tiny_config=tiny_molmo2_config,
    tiny_inputs=tiny_molmo2_inputs,
    description="Molmo2: SigLIP tower, attention-pooling adapter, Qwen3/OLMo decoder with QK-norm",
)

ADAPTERS = (molmo2,)
