"""Left-padded batches give each row exactly what it gets alone, on tiny models of every family."""

import pytest
import torch
from eval_helpers import make_items, processor_and_adapter

from lowrank_kit.data.samples import prompt_inputs
from lowrank_kit.eval.batching import BatchingError, collate
from lowrank_kit.eval.engine import evaluate
from lowrank_kit.models.tiny import TINY_FAMILIES, build_tiny_model, family_available
from lowrank_kit.registry import get_adapter

# Multiple-choice VQA: the VLM families (a text decoder's batches are the text side of these).
FAMILIES = [
    pytest.param(f, marks=pytest.mark.skipif(not family_available(f), reason=f"transformers lacks {f}"))
    for f in TINY_FAMILIES
    if not get_adapter(f).text_only
]


def image_sensitive(model, adapter):
    """Scale the projector so image features move the logits (Molmo2's tiny adapter output is ~1e-7)."""
    with torch.no_grad():
        for p in model.get_submodule(adapter.projector).parameters():
            p.mul_(30)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_at_a_time(family):
    processor, adapter = processor_and_adapter(family)
    model = image_sensitive(build_tiny_model(family), adapter)
    items = make_items(5)
    inputs = [prompt_inputs(processor, adapter, it) for it in items]
    # The rows really differ in length, so the batch has padding to get right.
    assert len({x["input_ids"].shape[1] for x in inputs}) > 1
    # Images matter: another picture changes the letter distribution (else the check below proves little).
    other = items[0].__class__(**{**items[0].__dict__, "image": items[1].image})
    a = evaluate(model, processor, adapter, [items[0]], batch_size=1, max_new_tokens=1)
    b = evaluate(model, processor, adapter, [other], batch_size=1, max_new_tokens=1)
    assert a.items[0].letter_logprobs != b.items[0].letter_logprobs

    batched = evaluate(model, processor, adapter, items, batch_size=5, max_new_tokens=6)
    single = evaluate(model, processor, adapter, items, batch_size=1, max_new_tokens=6)
    for x, y in zip(batched.items, single.items):
        assert x.prediction == y.prediction
        # fp32 with padding masked out: only summation order differs between the two runs.
        assert x.letter_logprobs == pytest.approx(y.letter_logprobs, abs=1e-5)
        assert x.nll == pytest.approx(y.nll, abs=1e-5)


def test_llava_next_rows_keep_their_image_sizes():
    processor, adapter = processor_and_adapter("llava_next")
    items = make_items(3, sizes=[(8, 8), (16, 8), (8, 16)])
    inputs = [prompt_inputs(processor, adapter, it) for it in items]
    batch = collate(inputs, pad_token_id=3)
    assert batch["image_sizes"].tolist() == [[8, 8], [8, 16], [16, 8]]
    # 2 tiles for the square image, 3 for the others; the square one is zero-padded to 3.
    assert batch["pixel_values"].shape[:2] == (3, 3)
    assert (batch["pixel_values"][0, 2] == 0).all()
    assert (batch["input_ids"][:, -1] == batch["input_ids"][0, -1]).all()  # left padding: rows end together


@pytest.mark.parametrize("per_image", [False, True])
def test_pooling_indices_follow_the_installed_convention(monkeypatch, per_image):
    from lowrank_kit.eval import batching

    monkeypatch.setattr(batching, "molmo2_pooling_per_image", lambda: per_image)
    rows = []
    for _ in range(2):
        pool = torch.tensor([[0, 1, -1], [2, 3, -1]])
        rows.append(
            {
                "input_ids": torch.tensor([[5, 6]]),
                "pixel_values": torch.zeros(1, 4, 8),
                "image_token_pooling": pool,
            }
        )
    batch = collate(rows, pad_token_id=0)
    # transformers <= 5.23: indices into the whole batch's patches; >= 5.25: each image's own.
    second = [[0, 1, -1], [2, 3, -1]] if per_image else [[4, 5, -1], [6, 7, -1]]
    assert batch["image_token_pooling"].tolist() == [[0, 1, -1], [2, 3, -1], *second]


def test_the_pooling_convention_is_read_from_the_installed_model():
    pytest.importorskip("transformers.models.molmo2")
    import transformers

    from lowrank_kit.models.families.molmo2 import molmo2_pooling_per_image

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) < (5, 25):
        pytest.skip(f"transformers {transformers.__version__}: only 5.25+ is known to take per-image indices")
    assert molmo2_pooling_per_image() is True


def test_unknown_input_is_an_error():
    row = {"input_ids": torch.tensor([[1, 2]]), "mystery": torch.zeros(1)}
    with pytest.raises(BatchingError, match=r"do not know how to batch the processor outputs mystery"):
        collate([row], pad_token_id=0)


def test_rows_with_different_inputs_are_an_error():
    a = {"input_ids": torch.tensor([[1, 2]]), "pixel_values": torch.zeros(1, 3)}
    b = {"input_ids": torch.tensor([[1, 2]])}
    with pytest.raises(BatchingError, match=r"item 1 has inputs \['input_ids'\], item 0 has"):
        collate([a, b], pad_token_id=0)


def test_empty_and_malformed_batches_are_errors():
    with pytest.raises(BatchingError, match="no inputs to batch"):
        collate([], pad_token_id=0)
    with pytest.raises(BatchingError, match=r"input_ids of shape \(2, 2\), expected one row"):
        collate([{"input_ids": torch.ones(2, 2, dtype=torch.long)}], pad_token_id=0)
