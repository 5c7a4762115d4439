"""The Qwen3 text decoder (``Qwen3ForCausalLM``), the language model of Molmo2: RMS norms on each query and
key head (QK-norm) before RoPE."""

from __future__ import annotations

from typing import Any

from transformers import Qwen3Config

from lowrank_kit.models.base import AttentionInfo, ModelAdapter
from lowrank_kit.models.families.common import attention_geometry, llama_bias, tiny_text
from lowrank_kit.models.families.text import causal_lm_paths, text_chat_inputs, tiny_text_inputs


def qwen3_attention_info(config: Any) -> AttentionInfo:
    return attention_geometry(config, qkv_bias=llama_bias, qk_norm=lambda text: "per_head")


def tiny_qwen3_config() -> Qwen3Config:
    return Qwen3Config(**tiny_text())


qwen3 = ModelAdapter(
    name="qwen3",
    display_name="Qwen3 (text)",
    model_class="Qwen3ForCausalLM",
    model_types=("qwen3",),
    **causal_lm_paths(),
    attention_info=qwen3_attention_info,
    build_inputs=text_chat_inputs,
    tiny_config=tiny_qwen3_config,
    tiny_inputs=tiny_text_inputs,
    description="Qwen3 text decoder: RoPE, GQA, per-head RMS QK-norm",
)

ADAPTERS = (qwen3,)
