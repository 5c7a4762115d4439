"""Processors for the tiny models of every family, so evaluation runs end to end on each of them.

LLaVA has a real tiny processor (lowrank_kit.models.tiny) and LLaVA-NeXT gets a real one here (its image
processor at the tiny tile size, so images of different shapes give different tile counts and
``image_sizes``). The other families get a stand-in: the tiny character tokenizer renders a LLaVA-style
chat and the image block and pixel inputs come from ``tiny_inputs`` (Qwen2-VL grids vary with the image
width, so rows of a batch carry different numbers of image tokens and patches).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
from PIL import Image

from lowrank_kit.data.items import VQAItem
from lowrank_kit.models.families.common import TINY_BOS
from lowrank_kit.models.tiny import TINY_LLAVA_CHAT_TEMPLATE, build_tiny_processor, tiny_config, tiny_inputs
from lowrank_kit.registry import get_adapter

COLOURS = ["red", "blue", "green", "yellow"]


def make_items(n: int = 5, sizes=None) -> list[VQAItem]:
    """Items of different prompt lengths, option counts and image shapes."""
    sizes = sizes or [(8, 8), (16, 8), (8, 16), (20, 9), (12, 12)]
    items = []
    for i in range(n):
        k = 2 + i % 3
        items.append(
            VQAItem(
                Image.new("RGB", sizes[i % len(sizes)], (40 * i % 256, 20, 200 - 30 * i)),
                "Which colour is the shape" + " really" * i + "?",
                COLOURS[:k],
                "ABCD"[i % k],
                hint="Look closely." if i % 2 else None,
                category=f"cat{i % 2}",
                index=i,
            )
        )
    return items


def llava_next_processor():
    import transformers

    config = tiny_config("llava_next")
    size = config.vision_config.image_size
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    return transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_processor("llava").tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=TINY_LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def _render(messages) -> str:
    text = ""
    for turn in messages:
        if turn["role"] == "user":
            text += f"USER: {turn['content']} "
        else:
            text += f"ASSISTANT: {turn['content']}</s>"
    if messages[-1]["role"] != "assistant":
        text += "ASSISTANT:"
    return text


def _seed(image: Image.Image) -> int:
    return sum(image.tobytes()) % 9973


def _qwen_block(family: str, image: Image.Image):
    config = tiny_config(family)
    vision = config.vision_config
    merge = vision.spatial_merge_size
    grid = (1, 2 * merge, 2 * merge * (2 if image.size[0] > image.size[1] else 1))
    n_patches = grid[0] * grid[1] * grid[2]
    block = [config.vision_start_token_id, *[config.image_token_id] * (n_patches // merge**2)]
    block.append(config.vision_end_token_id)
    channels = getattr(vision, "in_channels", None) or vision.in_chans
    dim = channels * vision.temporal_patch_size * vision.patch_size**2
    gen = torch.Generator().manual_seed(_seed(image))
    extras = {
        "pixel_values": torch.randn(n_patches, dim, generator=gen),
        "image_grid_thw": torch.tensor([grid]),
    }
    return block, extras, config.image_token_id


def _tiny_block(family: str, image: Image.Image):
    inputs = tiny_inputs(family, batch=1, seed=_seed(image))
    block = inputs["input_ids"][0, 3:-4].tolist()  # tiny_inputs wraps the block in 3 + 4 text tokens
    extras = {
        k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")
    }
    config = tiny_config(family)
    marker = getattr(config, "image_patch_id", None) if family == "molmo2" else config.image_token_id
    return block, extras, marker


def standin(family: str):
    """``(processor, adapter)`` for a family without a tiny processor: see the module docstring."""
    tokenizer = build_tiny_processor("llava").tokenizer
    uses_mm_types = family in ("qwen2_vl", "qwen2_5_vl", "molmo2")

    def build(processor, images, messages):
        block_fn = _qwen_block if family.startswith("qwen") else _tiny_block
        block, extras, marker = block_fn(family, images[0])
        text = tokenizer(_render(messages), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[TINY_BOS, *block, *text]])
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extras}
        if uses_mm_types:
            out["mm_token_type_ids"] = (ids == marker).long()
        return out

    processor = SimpleNamespace(tokenizer=tokenizer, chat_template="stand-in")
    return processor, dataclasses.replace(get_adapter(family), build_inputs=build)


def processor_and_adapter(family: str):
    if family == "llava":
        return build_tiny_processor("llava"), get_adapter("llava")
    if family == "llava_next":
        return llava_next_processor(), get_adapter("llava_next")
    return standin(family)
