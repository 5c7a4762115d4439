"""Aliases for real checkpoints, with their architectures written out.

Each :class:`Preset` maps an alias (``llava-1.5-7b``) to its hub id, its family and the checkpoint's
``config.json`` as a dict (the fields that shape the model: layers, widths, heads, vocabulary, RoPE,
vision tower, image tokens). :func:`preset_config` turns it into a transformers config and
:func:`build_random_model` builds the real architecture with random weights, so benchmarks get real
shapes without downloading 15 GB (a 7B model needs the GPU machine's memory; ``device="meta"`` builds
the skeleton anywhere).

Where the numbers come from (``Preset.source``): the llava-1.5-7b config was read from copies of
llava-hf/llava-1.5-7b-hf/config.json; the Vicuna-13B, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL numbers are
those of the released config.json files as documented by their model cards and transformers' own
defaults for these checkpoints; SmolVLM-Instruct's (model_type ``idefics3``) widths, layers, head_dim,
scale factor and image token were read from copies of its config.json, its rope_theta (273768) and
vocabulary (49155) are from the model card's config and were not re-read; Molmo2-8B's text widths,
layers, heads, head_dim, max positions, extra vocabulary and ViT/adapter sizes were read from a copy
of allenai/Molmo2-8B/config.json and from transformers' Molmo2 config (written for that checkpoint),
while its rope_theta (1e6, the Qwen3-8B backbone's) was not verifiable here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from lowrank_kit.errors import ModelLoadError, unknown_name
from lowrank_kit.models.classes import model_class_for


@dataclass(frozen=True)
class Preset:
    alias: str
    hub_id: str
    family: str
    params: str  # nominal size, for listings
    config: dict[str, Any] = field(repr=False)
    source: str = ""


def _vicuna(size: str) -> dict[str, Any]:
    widths = {
        "7b": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
        },
        "13b": {
            "hidden_size": 5120,
            "intermediate_size": 13824,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
        },
    }[size]
    return {
        "model_type": "llama",
        **widths,
        "num_key_value_heads": widths["num_attention_heads"],
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }


# CLIP ViT-L/14 at 336 px, the tower of LLaVA-1.5 and LLaVA-NeXT.
_CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}


def _llava(size: str) -> dict[str, Any]:
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": _vicuna(size),
        "vision_config": dict(_CLIP_L_336),
        "image_token_index": 32000,
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": 576,
        "tie_word_embeddings": False,
    }


def _llava_next(size: str) -> dict[str, Any]:
    return {
        "model_type": "llava_next",
        "architectures": ["LlavaNextForConditionalGeneration"],
        "text_config": _vicuna(size),
        "vision_config": dict(_CLIP_L_336),
        "image_token_index": 32000,
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "image_seq_length": 576,
        "use_image_newline_parameter": True,
        "tie_word_embeddings": False,
    }


_QWEN2_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "tie_word_embeddings": False,
}
_QWEN_VL_TOKENS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
# M-RoPE: the 64 rotary frequencies of head_dim 128 split over (time, height, width).
_MROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}

PRESETS: dict[str, Preset] = {
    p.alias: p
    for p in (
        Preset(
            "llava-1.5-7b",
            "llava-hf/llava-1.5-7b-hf",
            "llava",
            "7.06B",
            _llava("7b"),
            "config.json of llava-hf/llava-1.5-7b-hf (read); text widths are Llama-7B's",
        ),
        Preset(
            "llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", "llava", "13.35B", _llava("13b"), "Vicuna-13B v1.5"
        ),
        Preset(
            "llava-next-7b",
            "llava-hf/llava-v1.6-vicuna-7b-hf",
            "llava_next",
            "7.06B",
            _llava_next("7b"),
            "LLaVA-1.6 Vicuna-7B",
        ),
        Preset(
            "llava-next-13b",
            "llava-hf/llava-v1.6-vicuna-13b-hf",
            "llava_next",
            "13.35B",
            _llava_next("13b"),
            "LLaVA-1.6 Vicuna-13B",
        ),
        Preset(
            "smolvlm",
            "HuggingFaceTB/SmolVLM-Instruct",
            "smolvlm",
            "2.25B",
            {
                "model_type": "idefics3",
                "architectures": ["Idefics3ForConditionalGeneration"],
                "text_config": {
                    "model_type": "llama",
                    "hidden_size": 2048,
                    "intermediate_size": 8192,
                    "num_hidden_layers": 24,
                    "num_attention_heads": 32,
                    "num_key_value_heads": 32,
                    "head_dim": 64,
                    "vocab_size": 49155,
                    "max_position_embeddings": 16384,
                    "rope_theta": 273768.0,
                    "rms_norm_eps": 1e-5,
                    "attention_bias": False,
                    "hidden_act": "silu",
                    "tie_word_embeddings": False,
                },
                "vision_config": {
                    "model_type": "idefics3_vision",
                    "hidden_size": 1152,
                    "intermediate_size": 4304,
                    "num_hidden_layers": 27,
                    "num_attention_heads": 16,
                    "image_size": 384,
                    "patch_size": 14,
                },
                "scale_factor": 3,
                "image_token_id": 49153,
                "pad_token_id": 128002,
                "tie_word_embeddings": False,
            },
            "config.json of HuggingFaceTB/SmolVLM-Instruct (copies read; rope_theta and vocab not re-read)",
        ),
        Preset(
            "qwen2-vl-7b",
            "Qwen/Qwen2-VL-7B-Instruct",
            "qwen2_vl",
            "8.29B",
            {
                "model_type": "qwen2_vl",
                "architectures": ["Qwen2VLForConditionalGeneration"],
                "text_config": {
                    "model_type": "qwen2_vl_text",
                    **_QWEN2_7B_TEXT,
                    "max_position_embeddings": 32768,
                    "rope_parameters": dict(_MROPE),
                },
                "vision_config": {
                    "model_type": "qwen2_vl",
                    "depth": 32,
                    "embed_dim": 1280,
                    "hidden_size": 3584,
                    "mlp_ratio": 4,
                    "num_heads": 16,
                    "in_channels": 3,
                    "patch_size": 14,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                },
                **_QWEN_VL_TOKENS,
                "tie_word_embeddings": False,
            },
            "config.json of Qwen/Qwen2-VL-7B-Instruct",
        ),
        Preset(
            "qwen2.5-vl-7b",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            "qwen2_5_vl",
            "8.29B",
            {
                "model_type": "qwen2_5_vl",
                "architectures": ["Qwen2_5_VLForConditionalGeneration"],
                "text_config": {
                    "model_type": "qwen2_5_vl_text",
                    **_QWEN2_7B_TEXT,
                    "max_position_embeddings": 128000,
                    "rope_parameters": dict(_MROPE),
                },
                "vision_config": {
                    "model_type": "qwen2_5_vl",
                    "depth": 32,
                    "hidden_size": 1280,
                    "intermediate_size": 3420,
                    "out_hidden_size": 3584,
                    "num_heads": 16,
                    "in_channels": 3,
                    "patch_size": 14,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "window_size": 112,
                    "fullatt_block_indexes": [7, 15, 23, 31],
                    "tokens_per_second": 2,
                },
                **_QWEN_VL_TOKENS,
                "tie_word_embeddings": False,
            },
            "config.json of Qwen/Qwen2.5-VL-7B-Instruct",
        ),
        Preset(
            "molmo2-8b",
            "allenai/Molmo2-8B",
            "molmo2",
            "8.66B",
            {
                "model_type": "molmo2",
                "architectures": ["Molmo2ForConditionalGeneration"],
                "text_config": {
                    "model_type": "molmo2_text",
                    "hidden_size": 4096,
                    "intermediate_size": 12288,
                    "num_hidden_layers": 36,
                    "num_attention_heads": 32,
                    "num_key_value_heads": 8,
                    "head_dim": 128,
                    "vocab_size": 151936,
                    "additional_vocab_size": 128,
                    "max_position_embeddings": 36864,
                    "qk_norm_type": "qwen3",
                    "attention_bias": False,
                    "norm_after": False,
                    "rms_norm_eps": 1e-6,
                    "hidden_act": "silu",
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                    "tie_word_embeddings": False,
                },
                "vision_config": {
                    "model_type": "molmo2_vision",
                    "hidden_size": 1152,
                    "intermediate_size": 4304,
                    # The hub config declares 27 ViT layers; only the first 25 are read (vit_layers -3, -9).
                    "num_hidden_layers": 25,
                    "num_attention_heads": 16,
                    "num_key_value_heads": 16,
                    "head_dim": 72,
                    "image_size": [378, 378],
                    "patch_size": 14,
                },
                "adapter_config": {
                    "model_type": "molmo2_adapter",
                    "vision_feature_layer": [24, 18],
                    "hidden_size": 1152,
                    "num_attention_heads": 16,
                    "num_key_value_heads": 16,
                    "head_dim": 72,
                    "intermediate_size": 12288,
                    "text_hidden_size": 4096,
                    "hidden_act": "silu",
                },
                "tie_word_embeddings": False,
            },
            "config.json of allenai/Molmo2-8B (copy read); rope_theta from the Qwen3-8B backbone, not verified",
        ),
    )
}


def get_preset(alias: str) -> Preset:
    if alias not in PRESETS:
        raise unknown_name("model alias", alias, PRESETS)
    return PRESETS[alias]


def preset_config(alias: str):
    """The transformers config of the checkpoint behind ``alias`` (no download)."""
    preset = get_preset(alias)
    data = dict(preset.config)
    model_type = data.pop("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        arch = (data.get("architectures") or [model_type])[0]
        raise ModelLoadError(
            f"preset {alias!r} needs transformers.{arch} (model_type {model_type!r}), which transformers "
            f"{transformers.__version__} lacks; upgrade transformers"
        )
    return transformers.CONFIG_MAPPING[model_type](**data)


def build_random_model(
    alias: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    config: Any = None,
) -> nn.Module:
    """The real architecture of ``alias`` with random weights, built directly on ``device``.

    Building on the target device skips a host copy (a 7B model in bf16 is 14 GB); ``device="meta"``
    builds shapes only, for parameter counts without memory. ``config``: build this edited copy of the
    preset's config instead (fewer layers for a quick run, say).
    """
    config = preset_config(alias) if config is None else config
    cls = model_class_for(config)
    target = torch.device(device)
    cuda = [target.index or 0] if target.type == "cuda" else []
    # A private RNG stream on the devices the weights are drawn on; the caller's stream is left as it was.
    with torch.random.fork_rng(devices=cuda), target:
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=dtype)
    return model.eval()
