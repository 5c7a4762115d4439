"""Multiple-choice VQA items and the VLMEvalKit-style prompt built from them.

Calibration and evaluation build prompts with the same function, the way VLMEvalKit's multiple-choice
image datasets do: optional hint, the question, lettered options and an instruction to answer with the
option's letter.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

LETTERS = string.ascii_uppercase


@dataclass
class VQAItem:
    """One multiple-choice question about one image (ScienceQA / SEED-Bench style)."""

    image: Image.Image
    question: str
    options: list[str]
    answer: str  # the correct option's letter, "A".."Z"
    hint: str | None = None
    category: str = ""
    index: int | str = 0
    split: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.options) < 2:
            raise ValueError(
                f"item {self.index!r}: a multiple-choice item needs >= 2 options, got {len(self.options)}"
            )
        letters = LETTERS[: len(self.options)]
        if self.answer not in letters:
            raise ValueError(
                f"item {self.index!r}: answer {self.answer!r} is not one of {', '.join(letters)}"
            )

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    @property
    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)]


PROMPT_STYLES = ("letter", "dataset")
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
DATASET_INSTRUCTION = "Please select the correct answer from the options above. \n"


def build_mcq_prompt(item: VQAItem, style: str = "letter") -> str:
    """The text prompt for an item (the image goes in separately through the chat template).

    ``letter``: what VLMEvalKit's LLaVA-family wrappers build for multiple-choice data (hint and question
    on separate lines, ``A. text`` options, then the instruction to answer with the letter); our default,
    because every supported family is a chat model prompted this way.
    ``dataset``: VLMEvalKit's generic ``ImageMCQDataset.build_prompt`` (``Hint:``/``Question:``/``Options:``
    headers and its own instruction).
    """
    if style == "letter":
        prompt = f"{item.hint}\n{item.question}" if item.hint else item.question
        prompt += "".join(f"\n{letter}. {text}" for letter, text in zip(item.letters, item.options))
        return prompt + "\n" + LETTER_INSTRUCTION
    if style == "dataset":
        prompt = f"Hint: {item.hint}\n" if item.hint else ""
        prompt += f"Question: {item.question}\n"
        prompt += "Options:\n" + "".join(
            f"{letter}. {text}\n" for letter, text in zip(item.letters, item.options)
        )
        return prompt + DATASET_INSTRUCTION
    raise ValueError(f"unknown prompt style {style!r}; available: {', '.join(PROMPT_STYLES)}")
