"""The built-in model families: one :class:`~lowrank_kit.models.base.ModelAdapter` per family.

Module paths are those of transformers 5.x (checked by building each family's tiny model in
``tests/models``). Each adapter also carries a tiny config of its family (text hidden 64, 2 layers,
4 query heads over 2 KV heads, head_dim 16, vocabulary 256, a vision tower of width 32 and images of
8 to 56 pixels) so that tests and random-weight benchmarks never download anything.

``molmo`` (the older remote-code Molmo) is recognised but refused: its remote code fuses q, k and v
into one ``att_proj`` linear per block and rotates interleaved pairs, so there are no separate
q_proj/k_proj/v_proj modules for the decomposition to replace.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lowrank_kit.errors import ModelLoadError
from lowrank_kit.models.base import AttentionInfo, ModelAdapter, QKNormKind, RopeInfo

# -- tiny-config constants (also used by lowrank_kit.models.tiny) ------------------------------------
TINY_VOCAB = 256
TINY_BOS, TINY_EOS, TINY_PAD = 1, 2, 3
# Placeholder tokens sit at the top of the tiny vocabulary, away from the ids a tiny tokenizer uses.
TINY_IMAGE_TOKEN = 250
TINY_VIDEO_TOKEN = 251
TINY_VISION_START = 252
TINY_VISION_END = 253
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


def _tiny_text(**extra: Any) -> dict[str, Any]:
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


# -- reading a config ----------------------------------------------------------------------------------
def text_config(config: Any) -> Any:
    """The language model's config inside a VLM config (the config itself for a text-only config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rope(text: Any) -> RopeInfo:
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


def _geometry(
    config: Any,
    *,
    qkv_bias: Callable[[Any], tuple[bool, bool, bool]],
    qk_norm: Callable[[Any], QKNormKind | None] = lambda text: None,
    rope: Callable[[Any], RopeInfo] = _rope,
) -> AttentionInfo:
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


def _llama_bias(text: Any) -> tuple[bool, bool, bool]:
    bias = bool(getattr(text, "attention_bias", False))
    return bias, bias, bias


def _qwen2_bias(text: Any) -> tuple[bool, bool, bool]:
    # Qwen2's attention builds q/k/v with bias=True and o without, whatever the config says.
    return True, True, True


def _molmo2_qk_norm(text: Any) -> QKNormKind:
    kind = getattr(text, "qk_norm_type", None)
    if kind not in _QK_NORM_KINDS:
        raise ModelLoadError(
            f"Molmo2 config has qk_norm_type {kind!r}; supported: {', '.join(sorted(_QK_NORM_KINDS))}"
        )
    return _QK_NORM_KINDS[kind]


def _molmo2_rope(text: Any) -> RopeInfo:
    info = _rope(text)
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


def llama_attention_info(config: Any) -> AttentionInfo:
    return _geometry(config, qkv_bias=_llama_bias)


def qwen2_vl_attention_info(config: Any) -> AttentionInfo:
    return _geometry(config, qkv_bias=_qwen2_bias)


def molmo2_attention_info(config: Any) -> AttentionInfo:
    return _geometry(config, qkv_bias=_llama_bias, qk_norm=_molmo2_qk_norm, rope=_molmo2_rope)


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


# -- tiny configs --------------------------------------------------------------------------------------
def _tiny_clip(image_size: int) -> dict[str, Any]:
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


def tiny_llava_config():
    from transformers import LlavaConfig

    return LlavaConfig(
        text_config={"model_type": "llama", **_tiny_text()},
        vision_config=_tiny_clip(8),
        image_token_id=TINY_IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=4,
        pad_token_id=TINY_PAD,
        tie_word_embeddings=False,
    )


def tiny_llava_next_config():
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        text_config={"model_type": "llama", **_tiny_text()},
        vision_config=_tiny_clip(8),
        image_token_id=TINY_IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[8, 8], [8, 16], [16, 8]],
        image_seq_length=4,
        pad_token_id=TINY_PAD,
        tie_word_embeddings=False,
    )


def tiny_smolvlm_config():
    from transformers import SmolVLMConfig

    return SmolVLMConfig(
        text_config={"model_type": "llama", **_tiny_text()},
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


def _tiny_qwen_text() -> dict[str, Any]:
    # mrope_section splits head_dim / 2 = 8 rotary frequencies over (time, height, width).
    text = _tiny_text(
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


def tiny_qwen2_vl_config():
    from transformers import Qwen2VLConfig

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


def tiny_qwen2_5_vl_config():
    from transformers import Qwen2_5_VLConfig

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


def tiny_molmo2_config():
    import transformers

    if not hasattr(transformers, "Molmo2Config"):
        raise ModelLoadError(molmo2_missing_message())
    text = _tiny_text(
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


def molmo2_missing_message() -> str:
    import transformers

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
    import inspect

    from transformers.models.molmo2 import modeling_molmo2

    source = inspect.getsource(modeling_molmo2.Molmo2Model.get_image_features)
    return "image_num_crops" in source and "offsets" in source


MOLMO_REMOTE_REASON = (
    "the remote-code Molmo (model_type 'molmo', MolmoForCausalLM) is recognised but not supported, even with "
    "--trust-remote-code: its code fuses q, k and v into one `att_proj` linear per block "
    "(model.transformer.blocks.N.att_proj) and rotates interleaved pairs, so there are no q_proj/k_proj/v_proj "
    "modules to decompose; use Molmo2 instead (alias molmo2-8b)"
)


def _molmo_refused(config: Any) -> AttentionInfo:
    raise ModelLoadError(MOLMO_REMOTE_REASON)


# -- the adapters ----------------------------------------------------------------------------------------
_LLAVA_TEXT = "model.language_model"

llava = ModelAdapter(
    name="llava",
    display_name="LLaVA-1.5",
    model_class="LlavaForConditionalGeneration",
    model_types=("llava",),
    layers=f"{_LLAVA_TEXT}.layers",
    language_model=_LLAVA_TEXT,
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    embed_tokens=f"{_LLAVA_TEXT}.embed_tokens",
    final_norm=f"{_LLAVA_TEXT}.norm",
    attention_info=llama_attention_info,
    build_inputs=chat_template_inputs,
    tiny_config=tiny_llava_config,
    description="LLaVA-1.5: CLIP ViT-L/14-336 + 2-layer MLP projector + Vicuna (Llama) decoder",
)

llava_next = ModelAdapter(
    name="llava_next",
    display_name="LLaVA-NeXT (1.6)",
    model_class="LlavaNextForConditionalGeneration",
    model_types=("llava_next",),
    layers=f"{_LLAVA_TEXT}.layers",
    language_model=_LLAVA_TEXT,
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    embed_tokens=f"{_LLAVA_TEXT}.embed_tokens",
    final_norm=f"{_LLAVA_TEXT}.norm",
    attention_info=llama_attention_info,
    build_inputs=chat_template_inputs,
    tiny_config=tiny_llava_next_config,
    description="LLaVA-NeXT: LLaVA with any-resolution image tiles (image_sizes) and a Llama-family decoder",
)

_SMOL_TEXT = "model.text_model"

smolvlm = ModelAdapter(
    name="smolvlm",
    display_name="SmolVLM",
    model_class="SmolVLMForConditionalGeneration",
    # HuggingFaceTB/SmolVLM-Instruct is saved as Idefics3ForConditionalGeneration, the same layout.
    model_types=("smolvlm", "idefics3"),
    layers=f"{_SMOL_TEXT}.layers",
    language_model=_SMOL_TEXT,
    vision_tower="model.vision_model",
    projector="model.connector",
    embed_tokens=f"{_SMOL_TEXT}.embed_tokens",
    final_norm=f"{_SMOL_TEXT}.norm",
    attention_info=llama_attention_info,
    build_inputs=chat_template_inputs,
    tiny_config=tiny_smolvlm_config,
    description="SmolVLM / Idefics3: SigLIP tower, pixel-shuffle connector, SmolLM (Llama) decoder",
)

_QWEN_TEXT = "model.language_model"

qwen2_vl = ModelAdapter(
    name="qwen2_vl",
    display_name="Qwen2-VL",
    model_class="Qwen2VLForConditionalGeneration",
    model_types=("qwen2_vl",),
    layers=f"{_QWEN_TEXT}.layers",
    language_model=_QWEN_TEXT,
    vision_tower="model.visual",
    projector="model.visual.merger",
    embed_tokens=f"{_QWEN_TEXT}.embed_tokens",
    final_norm=f"{_QWEN_TEXT}.norm",
    attention_info=qwen2_vl_attention_info,
    build_inputs=chat_template_inputs,
    tiny_config=tiny_qwen2_vl_config,
    description="Qwen2-VL: native-resolution ViT with patch merger, Qwen2 decoder with M-RoPE and q/k/v bias",
)

qwen2_5_vl = ModelAdapter(
    name="qwen2_5_vl",
    display_name="Qwen2.5-VL",
    model_class="Qwen2_5_VLForConditionalGeneration",
    model_types=("qwen2_5_vl",),
    layers=f"{_QWEN_TEXT}.layers",
    language_model=_QWEN_TEXT,
    vision_tower="model.visual",
    projector="model.visual.merger",
    embed_tokens=f"{_QWEN_TEXT}.embed_tokens",
    final_norm=f"{_QWEN_TEXT}.norm",
    attention_info=qwen2_vl_attention_info,
    build_inputs=chat_template_inputs,
    tiny_config=tiny_qwen2_5_vl_config,
    description="Qwen2.5-VL: windowed-attention ViT, Qwen2 decoder with M-RoPE and q/k/v bias",
)

molmo2 = ModelAdapter(
    name="molmo2",
    display_name="Molmo2",
    model_class="Molmo2ForConditionalGeneration",
    model_types=("molmo2",),
    layers="model.language_model.layers",
    language_model="model.language_model",
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    embed_tokens="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    attention_info=molmo2_attention_info,
    norm_after=lambda config: bool(getattr(text_config(config), "norm_after", False)),
    build_inputs=chat_template_inputs,
    tiny_config=tiny_molmo2_config,
    description="Molmo2: SigLIP tower, attention-pooling adapter, Qwen3/OLMo decoder with QK-norm",
)

molmo = ModelAdapter(
    name="molmo",
    display_name="Molmo (remote code)",
    model_class="MolmoForCausalLM",
    model_types=("molmo",),
    # Paths of the public remote code (modeling_molmo.py of allenai/Molmo-7B-D-0924), for the record.
    layers="model.transformer.blocks",
    attention="",
    projections={"qkv_proj": "att_proj"},
    input_norm="attn_norm",
    post_attention_norm="ff_norm",
    mlp={"up_gate_proj": "ff_proj", "down_proj": "ff_out"},
    embed_tokens="model.transformer.wte",
    final_norm="model.transformer.ln_f",
    lm_head="model.transformer.ff_out",
    vision_tower="model.vision_backbone",
    projector="model.vision_backbone.image_projector",
    attention_info=_molmo_refused,
    trust_remote_code=True,
    description="older remote-code Molmo; refused: q/k/v are fused into att_proj",
)

ADAPTERS: tuple[ModelAdapter, ...] = (llava, llava_next, smolvlm, qwen2_vl, qwen2_5_vl, molmo2, molmo)
