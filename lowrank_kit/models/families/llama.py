"""Llama and Mistral text decoders (``LlamaForCausalLM``, ``MistralForCausalLM``): the language models of
LLaVA (Vicuna), LLaVA-NeXT (Vicuna, Mistral) and SmolVLM (SmolLM2)."""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig

from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.models.families.common import llama_attention_info, tiny_text
from lowrank_kit.models.families.text import causal_lm_paths, text_chat_inputs, tiny_text_inputs


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(**tiny_text())


def tiny_mistral_config() -> MistralConfig:
    # Mistral-7B-v0.1 slides a 4096-token window; later versions (and this tiny one) attend to everything.
    return MistralConfig(**tiny_text(), sliding_window=None)


llama = ModelAdapter(
    name="llama",
    display_name="Llama (text)",
    model_class="LlamaForCausalLM",
    model_types=("llama",),
    **causal_lm_paths(),
    attention_info=llama_attention_info,
    build_inputs=text_chat_inputs,
    tiny_config=tiny_llama_config,
    tiny_inputs=tiny_text_inputs,
    description="Llama-architecture text decoder (Llama 2/3, Vicuna, SmolLM2): RoPE, GQA, no q/k/v bias",
)

mistral = ModelAdapter(
    name="mistral",
    display_name="Mistral (text)",
    model_class="MistralForCausalLM",
    model_types=("mistral",),
    **causal_lm_paths(),
    attention_info=llama_attention_info,
    build_inputs=text_chat_inputs,
    tiny_config=tiny_mistral_config,
    tiny_inputs=tiny_text_inputs,
    description="Mistral text decoder: the Llama layout; a sliding window, where set, refuses latent decode",
)

ADAPTERS = (llama, mistral)
