"""evaluate(): the answer position, NLL and KL against independent computations, scores and errors."""

import math

import pytest
import torch
from eval_helpers import make_items

from lowrank_kit.data.samples import IGNORE_INDEX, make_sample, prompt_inputs
from lowrank_kit.eval.engine import (
    EvalResult,
    EvaluationError,
    ItemResult,
    answer_logits,
    answer_tokens,
    attach_kl,
    evaluate,
    letter_kl,
)
from lowrank_kit.models.families.llava import llava
from lowrank_kit.models.tiny import build_tiny_model, build_tiny_processor


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor("llava")


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llava")


def test_answer_tokens_of_the_tiny_template(processor):
    # The template writes "ASSISTANT: B</s>" after the prompt "... ASSISTANT:": a shared space, then the letter.
    tokens = answer_tokens(processor, llava, make_items(1)[0], 4)
    tok = processor.tokenizer
    assert list(tokens.prefix) == tok.convert_tokens_to_ids([" "])
    assert list(tokens.letter_ids) == tok.convert_tokens_to_ids(list("ABCD"))


def test_nll_matches_a_teacher_forced_forward(model, processor):
    """The NLL equals -log p(letter) read from make_sample's full conversation, a different code path."""
    items = make_items(4)
    result = evaluate(model, processor, llava, items, batch_size=3, max_new_tokens=2)
    for item, r in zip(items, result.items):
        sample = make_sample(processor, llava, item, 4096)
        answer = (sample.labels[0] != IGNORE_INDEX).nonzero()[:, 0]
        letter_pos = int(answer[1])  # answer span = " ", letter, "</s>"
        with torch.no_grad():
            logits = model(**sample.inputs).logits[0, letter_pos - 1]
        expected = -torch.log_softmax(logits.float(), -1)[sample.inputs["input_ids"][0, letter_pos]]
        assert r.nll == pytest.approx(float(expected), abs=1e-5)
        assert math.fsum(math.exp(x) for x in r.letter_logprobs) == pytest.approx(1.0, abs=1e-6)
        assert len(r.letter_logprobs) == len(item.options)


def test_first_generate_step_equals_the_forward_pass(model, processor):
    """Without an answer prefix the logits come from generate's first step; both routes agree."""
    from lowrank_kit.eval.engine import generate_texts, generation_settings

    inputs = [prompt_inputs(processor, llava, it) for it in make_items(3)]
    generation = generation_settings(model, processor, 2)
    _, batch, out = generate_texts(model, inputs, processor.tokenizer, generation, output_logits=True)
    assert torch.allclose(out.logits[0].float(), answer_logits(model, batch, ()), atol=1e-5)


def test_an_empty_answer_prefix_reads_generate_logits(model, processor):
    # A template whose generation prompt already ends in the space: the letter comes first.
    proc = build_tiny_processor("llava")
    proc.chat_template = proc.chat_template.replace("ASSISTANT: {% for", "ASSISTANT:{% for")
    items = make_items(3)
    tokens = answer_tokens(proc, llava, items[0], 3)
    assert tokens.prefix == ()
    result = evaluate(model, proc, llava, items, batch_size=2, max_new_tokens=2)
    assert result.settings["answer_prefix_tokens"] == []
    for item, r in zip(items, result.items):
        sample = make_sample(proc, llava, item, 4096)
        pos = int((sample.labels[0] != IGNORE_INDEX).nonzero()[0, 0])
        with torch.no_grad():
            logits = model(**sample.inputs).logits[0, pos - 1]
        expected = -torch.log_softmax(logits, -1)[sample.inputs["input_ids"][0, pos]]
        assert r.nll == pytest.approx(float(expected), abs=1e-5)


def test_kl_is_zero_against_itself_and_positive_against_another_model(model, processor):
    items = make_items(3)
    same = evaluate(model, processor, llava, items, max_new_tokens=1, reference=model)
    assert same.kl == pytest.approx(0.0, abs=1e-6)
    other = build_tiny_model("llava", seed=1)
    diff = evaluate(model, processor, llava, items, max_new_tokens=1, reference=other)
    ref = evaluate(other, processor, llava, items, max_new_tokens=1)
    for r, q in zip(diff.items, ref.items):
        assert r.kl == pytest.approx(letter_kl(q.letter_logprobs, r.letter_logprobs), abs=1e-7)
        assert r.kl > 0
    assert diff.settings["reference_accuracy"] == ref.accuracy


def test_letter_kl_by_hand():
    p, q = [math.log(0.5), math.log(0.5)], [math.log(0.9), math.log(0.1)]
    assert letter_kl(p, q) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))


def _row(index, category, correct, nll, predicted="A"):
    return ItemResult(index, category, "A", predicted or "", predicted, correct, nll, [math.log(0.5)] * 2)


def test_accuracy_and_per_category_aggregate_the_items():
    result = EvalResult(
        [
            _row(0, "x", True, 1.0),
            _row(1, "x", False, 3.0),
            _row(2, "y", True, 2.0),
            _row(3, "", False, 4.0, None),
        ]
    )
    assert result.accuracy == 0.5 and result.n == 4 and result.nll == 2.5 and result.unanswered == 1
    assert result.per_category == {
        "(none)": {"accuracy": 0.0, "n": 1, "nll": 4.0},
        "x": {"accuracy": 0.5, "n": 2, "nll": 2.0},
        "y": {"accuracy": 1.0, "n": 1, "nll": 2.0},
    }
    data = result.to_dict()
    assert {"accuracy", "n", "per_category", "nll", "kl"} <= set(data) and data["kl"] is None


def test_scores_come_from_the_generated_text(model, processor, monkeypatch):
    import lowrank_kit.eval.engine as engine

    items = make_items(4)
    answers = iter(["The answer is " + items[0].answer, "(b)", items[2].answer_text, ""])

    def fake_generate(model, inputs, tokenizer, generation, *, output_logits=False):
        texts, batch, out = real(model, inputs, tokenizer, generation, output_logits=output_logits)
        return [next(answers) for _ in texts], batch, out

    real = engine.generate_texts
    monkeypatch.setattr(engine, "generate_texts", fake_generate)
    result = evaluate(model, processor, llava, items, batch_size=4, max_new_tokens=1)
    assert [r.predicted for r in result.items] == [items[0].answer, None, items[2].answer, None]
    assert [r.correct for r in result.items] == [True, False, True, False]
    assert result.accuracy == 0.5


def test_evaluation_errors(model, processor):
    items = make_items(2)
    with pytest.raises(EvaluationError, match="no items to evaluate"):
        evaluate(model, processor, llava, [])
    with pytest.raises(EvaluationError, match="batch_size must be a positive integer, got 0"):
        evaluate(model, processor, llava, items, batch_size=0)
    with pytest.raises(EvaluationError, match="max_new_tokens must be a positive integer, got -1"):
        evaluate(model, processor, llava, items, max_new_tokens=-1)
    with pytest.raises(EvaluationError, match="unknown prompt style 'short'; available: letter, dataset"):
        evaluate(model, processor, llava, items, prompt_style="short")
    with pytest.raises(EvaluationError, match="has no processor"):
        evaluate(model, None, llava, items)


def test_reference_on_other_items_is_an_error(model, processor):
    items = make_items(3)
    ref = evaluate(model, processor, llava, items[:2], max_new_tokens=1)
    with pytest.raises(
        EvaluationError, match=r"the reference was evaluated on other items \(2 items, this run 3\)"
    ):
        attach_kl(evaluate(model, processor, llava, items, max_new_tokens=1), ref)


def test_letters_with_the_same_first_token_are_an_error(model):
    proc = build_tiny_processor("llava")
    # Every assistant turn renders as the same text: no letter can be told apart.
    proc.chat_template = proc.chat_template.replace("{{ item['text'] }}{% endfor %}</s>", "{% endfor %}X</s>")
    with pytest.raises(EvaluationError, match="option letters as tokens that do not differ"):
        evaluate(model, proc, llava, make_items(2))
