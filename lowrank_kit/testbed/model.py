"""The testbed model: a LLaVA (CLIP vision tower, 2-layer MLP projector, LLaMA decoder with RoPE).

Three sizes share the architecture and differ in width, depth and training length (see
:data:`SIZES`). The vision tower's patches are the scene's grid cells (48-pixel images, 12-pixel
patches: 16 image tokens), so the decoder, whose Q/K/V the compression methods factor, does the
reasoning: find the object the question names, read the asked property, match it to an option and
copy that option's letter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from lowrank_kit.data.synthetic import IMAGE_SIZE
from lowrank_kit.testbed.processor import IMAGE
from lowrank_kit.testbed.train import TrainSettings

PATCH_SIZE = 12


@dataclass(frozen=True)
class TestbedSize:
    """Architecture and training of one testbed size."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    train: TrainSettings
    threads: int | None = 2
    tie_embeddings: bool = True
    description: str = ""

    def summary(self) -> dict:
        return {
            "text": {
                "hidden_size": self.hidden,
                "layers": self.layers,
                "heads": self.heads,
                "kv_heads": self.kv_heads,
                "head_dim": self.head_dim,
                "intermediate_size": self.intermediate,
            },
            "vision": {
                "hidden_size": self.vision_hidden,
                "layers": self.vision_layers,
                "heads": self.vision_heads,
                "intermediate_size": self.vision_intermediate,
                "image_size": IMAGE_SIZE,
                "patch_size": PATCH_SIZE,
                "image_tokens": (IMAGE_SIZE // PATCH_SIZE) ** 2,
            },
        }


# tiny: seconds, for unit tests. small: `--model testbed`, at most 5 minutes on 2 CPU cores.
# base: head_dim 64 and more layers; trains on a GPU when there is one.
SIZES: dict[str, TestbedSize] = {
    "tiny": TestbedSize(
        name="tiny",
        hidden=64,
        layers=2,
        heads=2,
        kv_heads=2,
        head_dim=32,
        intermediate=128,
        vision_hidden=32,
        vision_layers=1,
        vision_heads=2,
        vision_intermediate=64,
        train=TrainSettings(
            train_items=3000, steps=1000, batch_size=16, lr=2e-3, warmup=10, weight_decay=0.01
        ),
        description="unit tests: trains in under a minute; above chance (0.25), far below the small size",
    ),
    "small": TestbedSize(
        name="small",
        hidden=128,
        layers=4,
        heads=4,
        kv_heads=4,
        head_dim=32,
        intermediate=256,
        vision_hidden=64,
        vision_layers=2,
        vision_heads=2,
        vision_intermediate=128,
        train=TrainSettings(
            train_items=4800,
            extra_items=(("count", 800), ("relation", 1600)),
            flat_qkv=True,
            steps=1250,
            batch_size=32,
            lr=2e-3,
            warmup=50,
            weight_decay=0.01,
        ),
        description="the default `--model testbed`",
    ),
    "base": TestbedSize(
        name="base",
        hidden=512,
        layers=8,
        heads=8,
        kv_heads=8,
        head_dim=64,
        intermediate=1024,
        vision_hidden=128,
        vision_layers=2,
        vision_heads=4,
        vision_intermediate=256,
        train=TrainSettings(
            train_items=12000, steps=2000, batch_size=64, lr=1e-3, warmup=100, weight_decay=0.01
        ),
        threads=None,
        description="head_dim 64, 8 layers; trains on a GPU when there is one",
    ),
}


def build_config(size: TestbedSize, vocab_size: int, special: dict[str, int]):
    """The ``LlavaConfig`` of ``size`` for a tokenizer of ``vocab_size`` with the given special ids."""

    text = {
        "model_type": "llama",
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "head_dim": size.head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rms_norm_eps": 1e-5,
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "pad_token_id": special["pad"],
        "tie_word_embeddings": size.tie_embeddings,
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": size.vision_hidden,
        "intermediate_size": size.vision_intermediate,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.vision_heads,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "projection_dim": size.vision_hidden,
    }
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=special["image"],
        # The last vision layer feeds the projector (LLaVA-1.5 takes the second-to-last of 24; a
        # 2-layer tower would waste half its depth that way).
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        projector_hidden_act="gelu",
        pad_token_id=special["pad"],
        tie_word_embeddings=size.tie_embeddings,
    )


def build_model(size: TestbedSize, tokenizer, seed: int):
    """A freshly initialised testbed model of ``size`` for ``tokenizer`` (weights drawn from ``seed``)."""

    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "image": tokenizer.convert_tokens_to_ids(IMAGE),
    }
    config = build_config(size, len(tokenizer), special)
    # A private RNG stream: the weights depend on `seed` only, and the caller's random state is kept.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model
