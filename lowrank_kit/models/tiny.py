"""Tiny models of every family, with valid image+text inputs, for tests and random-weight runs.

Everything is read from the registered adapters, so a plugin's family works as a built-in one does.
:func:`build_tiny_model` builds a family's tiny config (``adapter.tiny_config``) with seeded random
weights; :func:`tiny_inputs` makes inputs for it without a processor (``adapter.tiny_inputs``: the right
number of image placeholder tokens and pixel tensors of the right shape, plus ``image_sizes`` /
``image_grid_thw`` / ``pixel_attention_mask`` / Molmo2's pooling indices as the family needs) and adds the
attention mask; :func:`save_tiny_checkpoint`
writes a local model directory (config, safetensors and, for LLaVA, a tiny processor) so that loading
code runs on real files. :func:`build_tiny_processor` makes LLaVA's processor from in-code parts: a
character-level tokenizer, a CLIP image processor at the tiny image size and a LLaVA-1.5-style chat
template.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from torch import nn
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from lowrank_kit.errors import ModelLoadError, unknown_name
from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.models.families import ADAPTERS
from lowrank_kit.models.families.common import TINY_BOS, TINY_EOS, TINY_IMAGE_TOKEN, TINY_PAD, TINY_TEXT_IDS
from lowrank_kit.registry import adapter_for_config, adapters, get_adapter, get_registry

# The built-in families with a tiny model; a plugin's family is reached by its name all the same.
TINY_FAMILIES = tuple(a.name for a in ADAPTERS if a.tiny_config is not None and a.tiny_inputs is not None)


def _adapter(family: str) -> ModelAdapter:
    names = get_registry().names("model_adapter")
    if family not in names:
        raise unknown_name("model family", family, names)
    adapter = get_adapter(family)
    if adapter.tiny_config is None:
        raise ModelLoadError(f"model family {family!r} has no tiny config; {adapter.description}")
    return adapter


def family_available(family: str) -> bool:
    """Whether the installed transformers has this family's model class (Molmo2 needs >= 5.20 or so)."""
    return hasattr(transformers, _adapter(family).model_class)


def tiny_config(family: str):
    """The tiny transformers config of ``family``."""
    return _adapter(family).tiny_config()


def build_tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny ``family`` model with weights drawn from ``seed``, in eval mode, on the CPU."""
    adapter = _adapter(family)
    config = adapter.tiny_config()
    cls = getattr(transformers, adapter.model_class, None)
    if cls is None:
        raise ModelLoadError(
            f"{adapter.model_class} is not in transformers {transformers.__version__}; "
            "upgrade transformers to build this family's tiny model"
        )
    # A private RNG stream: building a tiny model must not shift the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=dtype)
    return model.eval()


def tiny_inputs(model_or_family: nn.Module | str, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Valid image+text inputs (one image per row) for a tiny model of a registered family.

    Pass the model (its config and dtype are used) or a family name (the family's tiny config, fp32).
    The family's adapter builds them (``adapter.tiny_inputs``); this adds the attention mask.
    Pixel values are random: these inputs exercise shapes and code paths, not image understanding.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if isinstance(model_or_family, str):
        adapter = _adapter(model_or_family)
        config, dtype = adapter.tiny_config(), torch.float32
    else:
        config = model_or_family.config
        dtype = next(model_or_family.parameters()).dtype
        adapter = adapter_for_config(config)
    if adapter.tiny_inputs is None:
        available = sorted(a.name for a in adapters() if a.tiny_inputs is not None)
        raise ModelLoadError(
            f"no tiny inputs for model family {adapter.name!r}: its adapter sets no tiny_inputs; "
            f"available: {', '.join(available)}"
        )
    gen = torch.Generator().manual_seed(seed)
    inputs = adapter.tiny_inputs(config, batch, gen, dtype)
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
    vocab = {"<unk>": 0, "<s>": TINY_BOS, "</s>": TINY_EOS, "<pad>": TINY_PAD}
    for i, ch in enumerate(string.printable):
        vocab[ch] = TINY_TEXT_IDS[0] + i
    vocab["<image>"] = TINY_IMAGE_TOKEN
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
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
