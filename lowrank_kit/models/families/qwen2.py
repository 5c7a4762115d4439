"""The Qwen2 text decoder (``Qwen2ForCausalLM``), the language model of Qwen2-VL: q/k/v with bias."""

from __future__ import annotations

from typing import Any

from transformers import Qwen2Config

from lowrank_kit.models.base import AttentionInfo, ModelAdapter
from lowrank_kit.models.families.common import attention_geometry, tiny_text
from lowrank_kit.models.families.text import causal_lm_paths, text_chat_inputs, tiny_text_inputs


def _qwen2_bias(text: Any) -> tuple[bool, bool, bool]:
    # Qwen2's attention builds q/k/v with bias=True and o without, whatever the config says.
    return True, True, True


def qwen2_attention_info(config: Any) -> AttentionInfo:
    return attention_geometry(config, qkv_bias=_qwen2_bias)


def tiny_qwen2_config() -> Qwen2Config:
    return Qwen2Config(**tiny_text())


qwen2 = ModelAdapter(
    name="qwen2",
    display_name="Qwen2 (text)",
    model_class="Qwen2ForCausalLM",
    model_types=("qwen2",),
    **causal_lm_paths(),
    attention_info=qwen2_attention_info,
    build_inputs=text_chat_inputs,
    tiny_config=tiny_qwen2_config,
    tiny_inputs=tiny_text_inputs,
    description="Qwen2 / Qwen2.5 text decoder: RoPE, GQA, q/k/v bias",
)

ADAPTERS = (qwen2,)
