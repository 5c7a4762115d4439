"""Helpers for the checkpoint tests: compress a tiny model, read greedy tokens, run the CLI."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from typer.testing import CliRunner

from lowrank_kit.cli.main import app
from lowrank_kit.data.calibration import CalibrationSample
from lowrank_kit.models.tiny import TINY_FAMILIES, build_tiny_model, family_available, tiny_inputs

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
NEW_TOKENS = 6
runner = CliRunner()


def fails(*args, env=None):
    """Run `lowrank ...`; return its one error line (asserting there is exactly one and no traceback)."""
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, res.output
    return errors[0]


def samples_for(model, n: int = 2, answer_tokens: int = 3) -> list[CalibrationSample]:
    """``n`` calibration samples of the tiny model's inputs whose last positions are the answer."""
    out = []
    for i in range(n):
        inputs = tiny_inputs(model, seed=100 + i)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -answer_tokens:] = inputs["input_ids"][:, -answer_tokens:]
        out.append(CalibrationSample(inputs, labels))
    return out


def compressed(family: str, method: str = "svd", ratio: float = 0.6, quant: str | None = None, seed: int = 0):
    """A tiny ``family`` model compressed in memory (a CompressionResult)."""
    import lowrank_kit

    model = build_tiny_model(family, seed=seed)
    recipe = lowrank_kit.recipe_from_flags(model=family, method=method, ratio=ratio, quant=quant)
    return lowrank_kit.compress(model, recipe, calibration=samples_for(model))


def greedy(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)


def hf_auto_class(adapter):
    """The transformers Auto class a user would load this family with: causal LM or image-text-to-text."""
    return AutoModelForCausalLM if adapter.text_only else AutoModelForImageTextToText
