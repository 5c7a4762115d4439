"""Helpers for the quantization tests: tiny models with non-trivial norm gains, recipes, logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import lowrank_kit
from lowrank_kit.data.calibration import CalibrationSample
from lowrank_kit.models.base import get_submodule
from lowrank_kit.models.tiny import TINY_FAMILIES, build_tiny_model, family_available, tiny_inputs
from lowrank_kit.recipe import parse_recipe
from lowrank_kit.registry import adapter_for_config

FAMILIES = [
    pytest.param(
        f,
        marks=pytest.mark.skipif(
            not family_available(f), reason=f"this transformers lacks the {f} model class"
        ),
    )
    for f in TINY_FAMILIES
]
DECOMPOSERS = ("svd", "asvd", "svdllm", "qsvd", "wsvd")


def samples(model, n: int = 2, answer_tokens: int = 3) -> list[CalibrationSample]:
    out = []
    for i in range(n):
        inputs = tiny_inputs(model, seed=100 + i)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -answer_tokens:] = inputs["input_ids"][:, -answer_tokens:]
        out.append(CalibrationSample(inputs, labels))
    return out


def with_gains(model, seed: int = 5):
    """Give every norm of the language model a random gain (tiny models start at 1, which folding would
    not exercise)."""
    adapter = adapter_for_config(model.config)
    norms = [get_submodule(model, adapter.final_norm)]
    for layer in adapter.decoder_layers(model):
        norms += [get_submodule(layer, adapter.input_norm), get_submodule(layer, adapter.post_attention_norm)]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=gen))
    return model


def tiny(family: str, seed: int = 0):
    return with_gains(build_tiny_model(family, seed=seed))


def decompose(model, family: str, method: str, ratio: float = 0.6, calibration=None):
    recipe = parse_recipe(
        {"model": family, "steps": [{"type": "decompose", "method": method, "ratio": ratio}]}
    )
    return lowrank_kit.compress(model, recipe, calibration=calibration or samples(model))


def quantize(model, family: str, scheme: str, methods=None, params=None, calibration=None):
    step = {"type": "quantize", "scheme": scheme}
    if methods is not None:
        step["methods"] = methods
    if params is not None:
        step["params"] = params
    recipe = parse_recipe({"model": family, "steps": [step]})
    return lowrank_kit.compress(model, recipe, calibration=calibration or samples(model))


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def hf_auto_class(adapter):
    """The transformers Auto class a user would load this family with: causal LM or image-text-to-text."""
    return AutoModelForCausalLM if adapter.text_only else AutoModelForImageTextToText
