"""What several model families share: reading a config, the chat-template inputs, the tiny vocabulary.

Every tiny config has a text model of hidden 64, 2 layers, 4 query heads over 2 KV heads, head_dim 16 and a
256-token vocabulary (:func:`tiny_text`); the placeholder ids below are reserved at the top of that
vocabulary. The family files build their tiny configs and processor-free inputs from these pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lowrank_kit.errors import ModelLoadError
from lowrank_kit.models.base import AttentionInfo, QKNormKind, RopeInfo

# -- the tiny vocabulary -------------------------------------------------------------------------------
TINY_VOCAB = 256
TINY_BOS, TINY_EOS, TINY_PAD = 1, 2, 3
# Placeholder tokens sit at the top of the tiny vocabulary, away from the ids a tiny tokenizer uses.
TINY_IMAGE_TOKEN = 250
TINY_VIDEO_TOKEN = 251
TINY_VISION_START = 252
TINY_VISION_END = 253
# Prompt tokens are drawn below the placeholder ids, so a random prompt never contains an image token.
TINY_TEXT_IDS = (4, 200)
_PREFIX, _SUFFIX = 3, 4


def tiny_text(**extra: Any) -> dict[str, Any]:
    """The text config every tiny model shares, plus ``extra`` keys."""
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": TINY_VOCAB,
        "max_position_embeddings": 512,
        "bos_token_id": TINY_BOS,
        "eos_token_id": TINY_EOS,
        "pad_token_id": TINY_PAD,
        "tie_word_embeddings": False,
        **extra,
    }


def tiny_clip_vision(image_size: int) -> dict[str, Any]:
    """A tiny CLIP vision tower (width 32, 4-pixel patches), as the LLaVA families use."""
    return {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 4,
        "projection_dim": 32,
    }


# -- tiny inputs without a processor ---------------------------------------------------------------------
def random_text_ids(gen: torch.Generator, batch: int, n: int) -> torch.Tensor:
    return torch.randint(*TINY_TEXT_IDS, (batch, n), generator=gen)


def wrap_image_block(gen: torch.Generator, batch: int, image_block: torch.Tensor) -> torch.Tensor:
    """``prefix + image_block + suffix`` per row: text around one image, as a chat template places it."""
    block = image_block.unsqueeze(0).expand(batch, -1)
    return torch.cat(
        [random_text_ids(gen, batch, _PREFIX), block, random_text_ids(gen, batch, _SUFFIX)], dim=1
    )


def random_pixels(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)


# -- reading a config ----------------------------------------------------------------------------------
def text_config(config: Any) -> Any:
    """The language model's config inside a VLM config (the config itself for a text-only config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def rope_info(text: Any) -> RopeInfo:
    params = dict(getattr(text, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        raise ModelLoadError(
            f"the {getattr(text, 'model_type', '?')!r} config has no rope_parameters['rope_theta']; "
            "lowrank_kit reads RoPE the transformers 5 way, so install transformers>=5.17"
        )
    section = params.get("mrope_section")
    return RopeInfo(
        kind="mrope" if section else "default",
        theta=float(params["rope_theta"]),
        parameters=params,
        mrope_section=tuple(int(s) for s in section) if section else None,
    )


def attention_geometry(
    config: Any,
    *,
    qkv_bias: Callable[[Any], tuple[bool, bool, bool]],
    qk_norm: Callable[[Any], QKNormKind | None] = lambda text: None,
    rope: Callable[[Any], RopeInfo] = rope_info,
) -> AttentionInfo:
    """The :class:`AttentionInfo` of ``config``'s language model; the family says biases, QK-norm and RoPE."""
    text = text_config(config)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    # Configs written before head_dim existed (LLaVA-1.5's Vicuna, Qwen2) imply hidden // heads.
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    if heads % kv_heads:
        raise ModelLoadError(
            f"the {getattr(text, 'model_type', '?')!r} config has {heads} query heads, not a multiple of its "
            f"{kv_heads} KV heads; grouped-query attention needs one"
        )
    q_bias, k_bias, v_bias = qkv_bias(text)
    return AttentionInfo(
        num_layers=int(text.num_hidden_layers),
        hidden_size=int(text.hidden_size),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        q_bias=q_bias,
        k_bias=k_bias,
        v_bias=v_bias,
        rope=rope(text),
        qk_norm=qk_norm(text),
    )


def llama_bias(text: Any) -> tuple[bool, bool, bool]:
    bias = bool(getattr(text, "attention_bias", False))
    return bias, bias, bias


def llama_attention_info(config: Any) -> AttentionInfo:
    return attention_geometry(config, qkv_bias=llama_bias)


def decoder_paths(root: str) -> dict[str, str]:
    """The module paths of a Llama-lineage decoder under ``root`` (``model.language_model`` in a VLM,
    ``model`` in a ``...ForCausalLM``): its layers, embeddings and final norm, as adapter fields."""
    return {
        "layers": f"{root}.layers",
        "language_model": root,
        "embed_tokens": f"{root}.embed_tokens",
        "final_norm": f"{root}.norm",
    }


# -- prompts -------------------------------------------------------------------------------------------
ROLES = ("system", "user", "assistant")


def chat_template_inputs(processor: Any, images: Sequence[Any], messages: Sequence[dict[str, str]]) -> dict:
    """Model inputs for a chat through the processor's own chat template.

    ``messages`` are ``{"role": "system" | "user" | "assistant", "content": str}`` turns; ``images``
    (PIL images) go into the first user turn, before its text, as every supported model was trained.
    A generation prompt is added unless the last turn is the assistant's (teacher-forced calibration).
    Everything the processor returns (``image_sizes``, ``image_grid_thw``, ``pixel_attention_mask``,
    ``image_token_pooling``, ...) is passed through as tensors.
    """
    if processor is None:
        raise ModelLoadError(
            "this model has no processor (random weights, or a directory without tokenizer/processor "
            "files); load it from a checkpoint that ships its processor"
        )
    if not messages:
        raise ValueError("build_inputs needs at least one message")
    conversation = []
    placed = False
    for turn in messages:
        role = turn.get("role")
        if role not in ROLES:
            raise ValueError(f"message role {role!r} is not one of {', '.join(ROLES)}")
        content: list[dict[str, Any]] = []
        if role == "user" and not placed:
            content.extend({"type": "image", "image": image} for image in images)
            placed = True
        content.append({"type": "text", "text": str(turn.get("content", ""))})
        conversation.append({"role": role, "content": content})
    if not placed:
        raise ValueError("build_inputs needs a user message to attach the images to")
    if getattr(processor, "chat_template", None) is None:
        raise ModelLoadError(
            f"the processor {type(processor).__name__} has no chat template; "
            "use a checkpoint whose processor ships chat_template.jinja or chat_template.json"
        )
    batch = processor.apply_chat_template(
        conversation,
        add_generation_prompt=messages[-1]["role"] != "assistant",
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    return {k: v for k, v in dict(batch).items() if isinstance(v, torch.Tensor)}
