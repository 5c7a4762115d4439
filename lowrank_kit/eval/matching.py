"""Answer extraction that agrees with VLMEvalKit's exact-matching path for multiple-choice data.

VLMEvalKit scores a multiple-choice prediction without a judge model (``exact_matching``) by
``can_infer``: first it looks for an option letter (``can_infer_option``), then for the text of exactly
one option (``can_infer_text``); a prediction where neither succeeds is wrong. The behaviour below is
that of VLMEvalKit at commit ``e8e78f0`` (August 2026), re-implemented from its documented behaviour:

Option letter (:func:`infer_option`):

1. a prediction containing one of VLMEvalKit's refusal phrases ("Cannot determine the answer", ...)
   is unanswered (no text rule either); one with its API-failure marker goes to the text rule;
2. the characters ``.()[],:;!*#{}`` become spaces and the prediction is split on whitespace;
3. if exactly one of the item's option letters (upper case) occurs among those words, and its first
   occurrence is one of the last four words, it is the answer ("B", "(B)", "The answer is C.");
4. no option letter but a lone word "Z" is unanswered (VLMEvalKit's own "none of these" letter);
5. otherwise "answer is X" / "correct answer is **X**" (case-insensitive, X one of A-D and one of the
   item's letters) names the answer.

Option text (:func:`infer_text`): the lower-cased prediction, if it is at most twice as long as all
option texts together, names the answer when exactly one lower-cased option text is a substring of it.

So ``"b"`` and ``"(b)"`` are not letters to VLMEvalKit (case matters in step 3); two letters ("A or
B") or a letter early in a long sentence ("A cat sits on a mat next to ...") match no letter and fall
through to the text rule. VLMEvalKit records an unmatched prediction as the letter ``Z``; here it is
``None``, and always wrong (VLMEvalKit would credit ``Z`` on an item whose answer is its 26th option).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lowrank_kit.data.items import LETTERS

# VLMEvalKit's `can_infer_option` rejects these outright (it maps the refusals to 'Z').
API_FAILURE = "Failed to obtain answer via API"
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_PUNCTUATION = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
# Letters inside the last this-many words count (VLMEvalKit: first index > len(words) - 5).
_TAIL_WORDS = 4
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _option(prediction: str, letters: Sequence[str]) -> tuple[str | None, bool]:
    """``(letter, final)``: ``final`` when VLMEvalKit stops here (it answers 'Z') without trying the text."""
    if API_FAILURE in prediction:
        return None, False
    if any(r in prediction for r in REFUSALS):
        return None, True
    words = prediction.translate(_PUNCTUATION).split()
    present = [letter for letter in letters if letter in words]
    if len(present) == 1:
        if words.index(present[0]) >= len(words) - _TAIL_WORDS:
            return present[0], True
    elif not present and "Z" in words:
        return None, True
    match = _VERBOSE_ANSWER.search(prediction)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper(), True
    return None, False


def infer_option(prediction: str, letters: Sequence[str]) -> str | None:
    """The option letter ``prediction`` names, or None (VLMEvalKit's ``can_infer_option``)."""
    return _option(prediction, letters)[0]


def infer_text(prediction: str, options: Sequence[str]) -> str | None:
    """The letter of the one option whose text ``prediction`` contains, or None (``can_infer_text``)."""
    answer = prediction.lower()
    if len(answer) > 2 * sum(len(str(o)) for o in options):
        return None
    found = [LETTERS[i] for i, text in enumerate(options) if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def extract_answer(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter a model's free-form ``prediction`` gives for ``options`` (VLMEvalKit's ``can_infer``).

    ``options`` are the option texts in letter order (A, B, ...). None means no option could be read
    from the prediction, which scores as wrong.
    """
    prediction = str(prediction)
    letter, final = _option(prediction, LETTERS[: len(options)])
    return letter if final else infer_text(prediction, options)
