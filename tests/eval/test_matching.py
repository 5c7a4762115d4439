"""Answer extraction agrees with VLMEvalKit's exact matching (can_infer) on tricky model outputs."""

import pytest

from lowrank_kit.eval.matching import extract_answer, infer_option, infer_text
from lowrank_kit.eval.vlmeval_bridge import vlmeval_available

OPTIONS = ["red", "blue", "green", "yellow"]

# (prediction, what VLMEvalKit's can_infer returns, with its unmatched 'Z' written as None)
CASES = [
    ("B", "B"),
    ("B.", "B"),
    ("(B)", "B"),
    ("(b)", None),  # lower case is not a letter to VLMEvalKit, and "(b)" contains no option text
    ("b", None),
    ("The answer is C.", "C"),
    ("The correct answer is **D**", "D"),
    ("answer is c", "C"),  # its "answer is X" rule is case-insensitive
    ("blue", "B"),
    ("It is blue.", "B"),
    ("Blue", "B"),
    ("A or B", None),  # two letters
    ("red or blue", None),  # two option texts
    ("", None),
    ("   ", None),
    ("Z", None),  # VLMEvalKit's own "no option" letter
    ("Cannot determine the answer B", None),  # a refusal phrase wins over any letter
    ("A cat is sitting on the mat next to a dog", None),  # 'A' early in a long sentence: an article
    ("I think it is A", "A"),
    ("C is wrong, so the colour must be the second one", None),  # the letter is not among the last 4 words
    ("C: green", "C"),
    ("[D]", "D"),
    ("yellowish", "D"),  # option text as a substring
    ("x" * 100 + " green", None),
    (
        "Failed to obtain answer via API. blue",
        None,
    ),  # no letter; too long for the text rule  # too long for the text rule (> 2x the option texts)
]


@pytest.mark.parametrize(("prediction", "expected"), CASES)
def test_tricky_outputs(prediction, expected):
    assert extract_answer(prediction, OPTIONS) == expected


def test_only_the_items_letters_count():
    # 'E' is not an option of a 4-option item; 'C' is.
    assert infer_option("E", "ABCD") is None
    assert extract_answer("C", ["x", "y", "z"]) == "C"
    assert extract_answer("D", ["x", "y", "z"]) is None


def test_text_rule_needs_a_unique_option():
    assert infer_text("dark red", ["red", "dark red"]) is None
    assert infer_text("a circle", ["circle", "square"]) == "A"


def test_api_failure_marker_goes_to_the_text_rule():
    long_options = ["a red circle in the middle", "a blue square at the top", "a green cross", "nothing"]
    assert extract_answer("Failed to obtain answer via API: a green cross", long_options) == "C"


@pytest.mark.skipif(
    not vlmeval_available(), reason="VLMEvalKit is not installed (install it from git to compare)"
)
def test_same_as_vlmevalkit_can_infer():
    from vlmeval.utils.matching_util import can_infer

    for prediction, _ in CASES:
        theirs = can_infer(prediction, dict(zip("ABCD", OPTIONS)))
        theirs = None if theirs in (False, "Z") else theirs
        assert extract_answer(prediction, OPTIONS) == theirs, prediction
