"""From a multiple-choice item to model inputs, through the model's own processor and chat template.

Calibration, evaluation and the testbed's training all build their inputs here, so a model is
calibrated and scored on exactly the prompts it answers:

- :func:`prompt_inputs`: the user turn (image + VLMEvalKit-style prompt) with the generation prompt,
  ready for ``generate`` or for reading the next-token distribution over the option letters;
- :func:`make_sample`: the same turn followed by the assistant's answer (the option letter), with
  ``labels`` marking the answer span for a teacher-forced cross-entropy.
"""

from __future__ import annotations

from typing import Any

import torch

from lowrank_kit.data.calibration import CalibrationSample
from lowrank_kit.data.items import VQAItem, build_mcq_prompt
from lowrank_kit.errors import CalibrationError, ModelLoadError
from lowrank_kit.models.families.common import chat_template_inputs

IGNORE_INDEX = -100


def _build(adapter, processor: Any, item: VQAItem, messages: list[dict[str, str]]) -> dict:
    build = adapter.build_inputs or chat_template_inputs
    return build(processor, [item.image], messages)


def prompt_inputs(
    processor: Any, adapter, item: VQAItem, *, prompt_style: str = "letter"
) -> dict[str, torch.Tensor]:
    """Inputs (batch 1) that end with the assistant's generation prompt."""
    return _build(
        adapter, processor, item, [{"role": "user", "content": build_mcq_prompt(item, prompt_style)}]
    )


def make_sample(
    processor: Any, adapter, item: VQAItem, max_length: int, *, prompt_style: str = "letter"
) -> CalibrationSample:
    """The item's prompt followed by its answer letter; ``labels`` = -100 except on the answer span.

    The answer span is every token of the assistant turn (the letter and the template's end-of-turn
    tokens), found as the part of the full conversation after the generation prompt. A template
    whose prompt is not a prefix of the full conversation cannot mark that span and is an error, as is
    a sample longer than ``max_length`` (image tokens cannot be cut).
    """
    prompt = build_mcq_prompt(item, prompt_style)
    user = {"role": "user", "content": prompt}
    full = _build(adapter, processor, item, [user, {"role": "assistant", "content": item.answer}])
    head = _build(adapter, processor, item, [user])
    ids, head_ids = full["input_ids"], head["input_ids"]
    n_head, n = head_ids.shape[-1], ids.shape[-1]
    if n <= n_head or not torch.equal(ids[0, :n_head], head_ids[0]):
        raise ModelLoadError(
            f"the chat template of {type(processor).__name__} does not render the prompt as a prefix of the "
            "prompt plus answer, so the answer tokens cannot be marked for calibration; use a processor "
            "whose template appends the assistant turn after the generation prompt"
        )
    if n > max_length:
        raise CalibrationError(
            f"calibration item {item.index!r} is {n} tokens long (image tokens included), over the "
            f"calibration max_length {max_length}; raise `calibration.max_length` in the recipe"
        )
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, n_head:] = ids[:, n_head:]
    return CalibrationSample(inputs=full, labels=labels)
