"""The testbed's tokenizer, image processor and chat template, built in code (nothing is downloaded).

The tokenizer is word-level over everything the testbed's prompts can contain: the generator's
vocabulary, both VLMEvalKit prompt styles (:func:`~lowrank_kit.data.items.build_mcq_prompt`), the
option letters and the chat template's words, so a prompt is about 50 tokens of which 16 are image
tokens. Whitespace only separates words (it is not a token); a word outside the vocabulary is
``<unk>``. Like a LLaMA tokenizer it starts every text with ``<s>``. The chat template is LLaVA-1.5's
conversation format (``USER: <image>\\n... ASSISTANT: ...</s>``), and the image processor is CLIP's at
the testbed's image size.
"""

from __future__ import annotations

import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from lowrank_kit.data.items import DATASET_INSTRUCTION, LETTER_INSTRUCTION, LETTERS
from lowrank_kit.data.synthetic import QUARTERS, RELATIONS
from lowrank_kit.data.synthetic import vocabulary as item_vocabulary

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL = (PAD, BOS, EOS, UNK, IMAGE)

# LLaVA-1.5's conversation format: an optional system line, "USER: <image>\n{prompt} ASSISTANT: {answer}</s>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}\n"
    "{% elif message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Fixed phrases of every prompt, one token each (as a BPE tokenizer would merge a frequent phrase):
# the chat template's role markers and the two prompt styles' instructions.
# The multi-word answers are one token each too, so every answer is one token.
PHRASES = (
    "USER:",
    "ASSISTANT:",
    LETTER_INSTRUCTION.strip(),
    DATASET_INSTRUCTION.strip(),
    *(a for a in (*QUARTERS, *RELATIONS) if " " in a),
)
# Words of the parts of a prompt that are not the generator's (the `dataset` style's headers).
_FRAME = ("Hint Question Options", ":")
_WORD = re.compile(r"\w+|[^\w\s]")


def vocabulary() -> list[str]:
    """Token strings in id order: the special tokens, the option letters, then every other word."""
    words: dict[str, None] = dict.fromkeys(SPECIAL)
    words.update(dict.fromkeys(LETTERS))
    for text in _FRAME:
        words.update(dict.fromkeys(_WORD.findall(text)))
    words.update(dict.fromkeys(item_vocabulary()))
    words.update(dict.fromkeys(PHRASES))
    return list(words)


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary`."""

    vocab = {word: i for i, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Words and single punctuation marks; the whitespace between them is dropped.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    # Already in the vocabulary; registering them makes them match before words are split.
    tokenizer.add_tokens([AddedToken(p, normalized=False) for p in PHRASES])
    return tokenizer


def build_processor(image_size: int, patch_size: int):
    """LLaVA's processor for the testbed: the word-level tokenizer, CLIP's image processor, the template."""

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )
