"""Calibration samples through a real processor and chat template: the answer span and its errors."""

import pytest
import torch
from PIL import Image

from lowrank_kit.data.items import VQAItem, build_mcq_prompt
from lowrank_kit.data.samples import IGNORE_INDEX, make_sample, prompt_inputs
from lowrank_kit.errors import CalibrationError, ModelLoadError
from lowrank_kit.models.families.llava import llava
from lowrank_kit.models.tiny import build_tiny_processor


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor("llava")


def item(answer="B"):
    return VQAItem(
        Image.new("RGB", (20, 12), (1, 2, 3)), "Which colour?", ["red", "blue", "green"], answer, hint="h"
    )


def test_labels_mark_exactly_the_assistant_turn(processor):
    s = make_sample(processor, llava, item("C"), 2048)
    head = prompt_inputs(processor, llava, item("C"))["input_ids"]
    n = head.shape[-1]
    ids = s.inputs["input_ids"]
    assert torch.equal(ids[0, :n], head[0])
    assert (s.labels[0, :n] == IGNORE_INDEX).all()
    assert torch.equal(s.labels[0, n:], ids[0, n:])
    assert processor.tokenizer.decode(ids[0, n:]).strip() == "C</s>"
    # The prompt is VLMEvalKit's multiple-choice prompt, image first.
    text = processor.tokenizer.decode(ids[0])
    assert build_mcq_prompt(item()) in text and text.index("<image>") < text.index("Which colour?")
    assert s.inputs["pixel_values"].shape == (1, 3, 8, 8)


def test_too_long_for_max_length(processor):
    with pytest.raises(CalibrationError, match=r"tokens long .* over the calibration max_length 16"):
        make_sample(processor, llava, item(), 16)


def test_a_template_that_does_not_extend_the_prompt_is_an_error(processor):
    bad = build_tiny_processor("llava")
    # Renders the assistant turn before the user turn: the prompt is no longer a prefix.
    bad.chat_template = (
        "{% for m in messages|reverse %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    with pytest.raises(ModelLoadError, match="answer tokens cannot be marked"):
        make_sample(bad, llava, item(), 2048)
