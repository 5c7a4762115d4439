"""Tiny models of every family, with valid image+text inputs, for tests and random-weight runs.

:func:`build_tiny_model` builds a family's tiny config (``adapter.tiny_config``) with seeded random
weights; :func:`tiny_inputs` makes inputs for it without a processor (the right number of image
placeholder tokens and pixel tensors of the right shape, plus ``image_sizes`` / ``image_grid_thw`` /
``pixel_attention_mask`` / Molmo2's pooling indices as the family needs); :func:`save_tiny_checkpoint`
writes a local model directory (config, safetensors and, for LLaVA, a tiny processor) so that loading
code runs on real files. :func:`build_tiny_processor` makes LLaVA's processor from in-code parts: a
character-level tokenizer, a CLIP image processor at the tiny image size and a LLaVA-1.5-style chat
template.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_kit.errors import ModelLoadError, unknown_name
from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.models.families import (
    TINY_BOS,
    TINY_EOS,
    TINY_IMAGE_TOKEN,
    TINY_PAD,
    molmo2_pooling_per_image,
)

# Prompt tokens are drawn below the placeholder ids, so a random prompt never contains an image token.
_TEXT_IDS = (4, 200)
_PREFIX, _SUFFIX = 3, 4


def _adapter(family: str) -> ModelAdapter:
    from lowrank_kit.registry import get_registry

    reg = get_registry()
    if family not in reg.names("model_adapter"):
        raise unknown_name("model family", family, reg.names("model_adapter"))
    adapter = reg.get("model_adapter", family)
    if adapter.tiny_config is None:
        raise ModelLoadError(f"model family {family!r} has no tiny config; {adapter.description}")
    return adapter


TINY_FAMILIES = ("llava", "llava_next", "smolvlm", "qwen2_vl", "qwen2_5_vl", "molmo2")


def family_available(family: str) -> bool:
    """Whether the installed transformers has this family's model class (Molmo2 needs >= 5.20 or so)."""
    import transformers

    return hasattr(transformers, _adapter(family).model_class)


def tiny_config(family: str):
    """The tiny transformers config of ``family``."""
    return _adapter(family).tiny_config()


def build_tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny ``family`` model with weights drawn from ``seed``, in eval mode, on the CPU."""
    from lowrank_kit.models.loading import model_class_for

    config = tiny_config(family)
    cls = model_class_for(config)
    # A private RNG stream: building a tiny model must not shift the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=dtype)
    return model.eval()


# -- inputs without a processor ------------------------------------------------------------------------
def _text_ids(gen: torch.Generator, batch: int, n: int) -> torch.Tensor:
    return torch.randint(*_TEXT_IDS, (batch, n), generator=gen)


def _wrap(gen: torch.Generator, batch: int, image_block: torch.Tensor) -> torch.Tensor:
    """``prefix + image_block + suffix`` per row: text around one image, as a chat template places it."""
    block = image_block.unsqueeze(0).expand(batch, -1)
    return torch.cat([_text_ids(gen, batch, _PREFIX), block, _text_ids(gen, batch, _SUFFIX)], dim=1)


def _pixels(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)


def _llava_inputs(config: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    # The "default" strategy drops the CLS token; "full" keeps it.
    n_tokens = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    ids = _wrap(gen, batch, torch.full((n_tokens,), config.image_token_id))
    pixels = _pixels(gen, (batch, 3, vision.image_size, vision.image_size), dtype)
    return {"input_ids": ids, "pixel_values": pixels}


def _llava_next_inputs(config: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
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
    ids = _wrap(gen, batch, torch.full((n_tokens,), config.image_token_id))
    pixels = _pixels(gen, (batch, 2, 3, size, size), dtype)
    sizes = torch.tensor([[size, size]] * batch)
    return {"input_ids": ids, "pixel_values": pixels, "image_sizes": sizes}


def _smolvlm_inputs(config: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    vision = config.vision_config
    size = vision.image_size
    n_tokens = (size // vision.patch_size) ** 2 // config.scale_factor**2
    ids = _wrap(gen, batch, torch.full((n_tokens,), config.image_token_id))
    pixels = _pixels(gen, (batch, 1, 3, size, size), dtype)
    mask = torch.ones((batch, 1, size, size), dtype=torch.bool)
    return {"input_ids": ids, "pixel_values": pixels, "pixel_attention_mask": mask}


def _qwen_vl_inputs(config: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    vision = config.vision_config
    merge = vision.spatial_merge_size
    grid = (1, 2 * merge, 2 * merge)  # one frame of 2×2 merged tokens, each from merge×merge patches
    n_patches = grid[0] * grid[1] * grid[2]
    n_tokens = n_patches // merge**2
    block = torch.tensor(
        [config.vision_start_token_id] + [config.image_token_id] * n_tokens + [config.vision_end_token_id]
    )
    ids = _wrap(gen, batch, block)
    channels = getattr(vision, "in_channels", None) or vision.in_chans
    patch_dim = channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = _pixels(gen, (batch * n_patches, patch_dim), dtype)
    return {
        "input_ids": ids,
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([grid] * batch),
        # M-RoPE gives image tokens 3-D positions; this marks which tokens they are (1 = image).
        "mm_token_type_ids": (ids == config.image_token_id).long(),
    }


def _molmo2_inputs(config: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
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
    ids = _wrap(gen, batch, block)
    patch_dim = vision.num_channels * vision.patch_size**2
    return {
        "input_ids": ids,
        "pixel_values": _pixels(gen, (batch, n_patches, patch_dim), dtype),
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


_INPUT_BUILDERS: dict[str, Callable[[Any, int, torch.Generator, torch.dtype], dict]] = {
    "llava": _llava_inputs,
    "llava_next": _llava_next_inputs,
    "smolvlm": _smolvlm_inputs,
    "qwen2_vl": _qwen_vl_inputs,
    "qwen2_5_vl": _qwen_vl_inputs,
    "molmo2": _molmo2_inputs,
}


def tiny_inputs(model_or_family: nn.Module | str, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Valid image+text inputs (one image per row) for a tiny model of a built-in family.

    Pass the model (its config and dtype are used) or a family name (the family's tiny config, fp32).
    Pixel values are random: these inputs exercise shapes and code paths, not image understanding.
    """
    from lowrank_kit.models.loading import adapter_for_config

    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if isinstance(model_or_family, str):
        config, dtype = tiny_config(model_or_family), torch.float32
    else:
        config = model_or_family.config
        dtype = next(model_or_family.parameters()).dtype
    family = adapter_for_config(config).name
    if family not in _INPUT_BUILDERS:
        raise ModelLoadError(
            f"no tiny inputs for model family {family!r}; available: {', '.join(sorted(_INPUT_BUILDERS))}"
        )
    gen = torch.Generator().manual_seed(seed)
    inputs = _INPUT_BUILDERS[family](config, batch, gen, dtype)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if not isinstance(model_or_family, str):
        device = next(model_or_family.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
    return inputs


# -- a tiny LLaVA processor ----------------------------------------------------------------------------
# A LLaVA-1.5-style conversation ("USER: <image>\n... ASSISTANT: ...</s>"), written for the tiny tokenizer.
TINY_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% else %}{% for item in message['content'] %}{{ item['text'] }}{% endfor %}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tiny_tokenizer():
    """A character-level tokenizer over printable ASCII, with LLaVA's special tokens at the tiny ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": TINY_BOS, "</s>": TINY_EOS, "<pad>": TINY_PAD}
    for i, ch in enumerate(string.printable):
        vocab[ch] = _TEXT_IDS[0] + i
    vocab["<image>"] = TINY_IMAGE_TOKEN
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_tiny_processor(family: str):
    """A processor for the tiny ``family`` model, built in code (LLaVA only)."""
    if family != "llava":
        raise ModelLoadError(f"no tiny processor for model family {family!r}; available: llava")
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    config = tiny_config(family)
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=_tiny_tokenizer(),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=TINY_LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )


TINY_PROCESSOR_FAMILIES = ("llava",)


def save_tiny_checkpoint(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``family`` model as a local directory (config.json + model.safetensors [+ processor])."""
    path = Path(path)
    model = build_tiny_model(family, seed=seed)
    model.save_pretrained(path)
    if family in TINY_PROCESSOR_FAMILIES:
        build_tiny_processor(family).save_pretrained(path)
    return path
