"""Perplexity and KL over token windows, checked against a hand computation on a tiny random Llama."""

import copy
import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lowrank_kit.data.text import corpus_text, token_windows
from lowrank_kit.eval.engine import EvaluationError
from lowrank_kit.eval.perplexity import perplexity
from lowrank_kit.models.tiny import _tiny_tokenizer
from lowrank_kit.progress import Reporter

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def windows():
    return torch.randint(0, VOCAB, (5, 17), generator=torch.Generator().manual_seed(1))


def _hand_nll(model, windows):
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1)).item()


def test_perplexity_is_exp_of_the_mean_nll_of_the_next_tokens(model, windows):
    result = perplexity(model, windows, batch_size=2)  # 2 + 2 + 1: the last batch is short
    nll = _hand_nll(model, windows)
    # fp32 logits on both sides; the sums differ only in order (float64 here, float32 in cross_entropy).
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert (result["tokens"], result["windows"], result["kl"]) == (5 * 16, 5, None)
    assert perplexity(model, windows, batch_size=5)["nll"] == pytest.approx(result["nll"], rel=1e-5)


def test_kl_is_zero_against_itself_and_positive_against_a_perturbed_copy(model, windows):
    same = perplexity(model, windows, reference=copy.deepcopy(model))
    assert abs(same["kl"]) < 1e-6
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.layers[0].mlp.down_proj.weight.add_(
            0.5
            * torch.randn(perturbed.model.layers[0].mlp.down_proj.weight.shape, generator=torch.Generator())
        )
    result = perplexity(perturbed, windows, reference=model, batch_size=3)
    with torch.no_grad():
        ref = model(input_ids=windows).logits[:, :-1].float().log_softmax(-1).reshape(-1, VOCAB)
        out = perturbed(input_ids=windows).logits[:, :-1].float().log_softmax(-1).reshape(-1, VOCAB)
    expected = F.kl_div(out, ref, log_target=True, reduction="batchmean").item()  # KL(ref || out) per token
    assert result["kl"] > 1e-4
    assert result["kl"] == pytest.approx(expected, rel=1e-4)


class _MaskedFirstToken(nn.Module):
    """A minimal causal LM: a forward with ``input_ids`` returning ``.logits``; token 0 gets -inf."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, **kwargs):
        logits = self.model(input_ids=input_ids).logits.clone()
        logits[..., 0] = -math.inf
        return SimpleNamespace(logits=logits)


def test_a_token_the_reference_rules_out_adds_nothing_to_kl(model, windows):
    masked = _MaskedFirstToken(model).eval()
    windows = windows.clamp(min=1)  # token 0 never occurs, so the masked model's NLL stays finite
    assert perplexity(masked, windows, reference=masked)["kl"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(perplexity(model, windows, reference=masked)["kl"])


def test_windows_of_real_text_from_the_corpus(model):
    text = corpus_text("text:pydoc", "evaluation")
    windows = token_windows(_tiny_tokenizer(), text[:5000], 32, max_windows=3)
    assert windows.shape == (3, 32) and int(windows.max()) < VOCAB
    result = perplexity(model, windows)
    assert result["tokens"] == 3 * 31
    # A random model is about uniform over the vocabulary: perplexity near VOCAB, far from 1.
    assert VOCAB / 2 < result["perplexity"] < VOCAB * 2


class _Recorder(Reporter):
    def __init__(self):
        self.finished = []

    def _finish(self, stage):
        self.finished.append((stage.name, stage.total, stage.completed))


def test_one_progress_stage_counts_the_windows(model, windows):
    reporter = _Recorder()
    perplexity(model, windows, batch_size=2, reporter=reporter)
    assert reporter.finished == [("perplexity", 5, 5)]


def test_a_model_in_training_mode_is_reported(model, windows, caplog):
    model.train()
    try:
        with caplog.at_level(logging.WARNING, logger="lowrank_kit.eval.perplexity"):
            perplexity(model, windows[:1])
    finally:
        model.eval()
    assert "LlamaForCausalLM is in training mode" in caplog.text


@pytest.mark.parametrize(
    ("bad", "kwargs", "match"),
    [
        (
            torch.zeros(4, 8),
            {},
            r"needs token windows as a \[n, T\] long tensor, got torch.float32 of shape \(4, 8\)",
        ),
        (torch.zeros(8, dtype=torch.long), {}, r"\[n, T\] long tensor, got torch.int64 of shape \(8,\)"),
        (
            torch.zeros(0, 8, dtype=torch.long),
            {},
            r"at least one window of 2 or more tokens, got shape \(0, 8\)",
        ),
        (
            torch.zeros(3, 1, dtype=torch.long),
            {},
            r"at least one window of 2 or more tokens, got shape \(3, 1\)",
        ),
        (torch.zeros(3, 8, dtype=torch.long), {"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ],
)
def test_invalid_windows_and_settings_are_evaluation_errors(model, bad, kwargs, match):
    with pytest.raises(EvaluationError, match=match):
        perplexity(model, bad, **kwargs)
