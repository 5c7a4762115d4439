"""The hadamard rotation leaves an fp32 model's logits unchanged, decomposed or not, on every family."""

import logging

import pytest
import torch
from quant_helpers import FAMILIES, decompose, logits, quantize, rel, samples, tiny, with_gains

from lowrank_kit.errors import LowRankError
from lowrank_kit.loading import model_class_for
from lowrank_kit.models.tiny import family_available, tiny_config, tiny_inputs
from lowrank_kit.quant.modules import HadamardInput

# fp32 rotations of a 2-layer model: the logits differ by rounding only (~4e-7 observed).
EXACT = 1e-5


def _rotated_error(model, family, method, **params):
    if method is not None:
        decompose(model, family, method)
    inputs = tiny_inputs(model, seed=3)
    before = logits(model, inputs)
    result = quantize(
        model, family, "w8a8", methods=["hadamard"], params={"hadamard": params} if params else None
    )
    return rel(logits(model, inputs), before), result


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [None, "svd", "wsvd", "qsvd"])
def test_rotation_keeps_the_logits(family, method):
    model = tiny(family)
    err, result = _rotated_error(model, family, method)
    assert err < EXACT
    report = result.report["quantize"]["hadamard"]
    assert report["random_orthogonal_fallbacks"] == []
    # The rotation did happen: online transforms are in place and the norms' gains are folded away.
    attn = result.adapter.attention_module(model, 0)
    assert isinstance(attn.o_proj, HadamardInput)
    layer = result.adapter.decoder_layers(model)[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))


@pytest.mark.parametrize("method", [None, "wsvd"])
def test_latents_are_unchanged_by_the_rotation(method):
    model = tiny("qwen2_vl")
    if method:
        decompose(model, "qwen2_vl", method)
    inputs = tiny_inputs(model, seed=3)
    seen = {}
    k = model.model.language_model.layers[1].self_attn.k_proj

    def grab(tag):
        handle = k.register_forward_hook(lambda m, a, out: seen.__setitem__(tag, out.detach().clone()))
        logits(model, inputs)
        handle.remove()

    grab("before")
    quantize(model, "qwen2_vl", "w8a8", methods=["hadamard"])
    grab("after")
    # K outputs (with Qwen2's k bias) pass through unchanged: only V and o_proj carry head rotations.
    assert rel(seen["after"], seen["before"]) < EXACT


@pytest.mark.parametrize(
    "params",
    [{"online_down": False}, {"online_o": False}, {"online_down": False, "online_o": False, "seed": 7}],
)
def test_rotation_without_online_transforms_is_exact(params):
    model = tiny("llava")
    err, result = _rotated_error(model, "llava", "svd", **params)
    assert err < EXACT
    attn = result.adapter.attention_module(model, 0)
    assert isinstance(attn.o_proj, HadamardInput) == params.get("online_o", True)


def _custom(family, **text):
    config = tiny_config(family)
    for key, value in text.items():
        setattr(config.get_text_config(), key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class_for(config)._from_config(config, dtype=torch.float32).eval()
    return with_gains(model)


@pytest.mark.parametrize("method", [None, "wsvd"])
def test_non_power_of_two_sizes(method, caplog):
    # hidden 48 = 4·12 (Paley I, q = 11), intermediate 108 (Paley I, q = 107), 3 heads (no Hadamard
    # matrix: a seeded random orthogonal one, logged), GQA 3:1.
    model = _custom(
        "llava", hidden_size=48, intermediate_size=108, num_attention_heads=3, num_key_value_heads=1
    )
    with caplog.at_level(logging.WARNING):
        err, result = _rotated_error(model, "llava", method)
    assert err < EXACT
    report = result.report["quantize"]["hadamard"]
    assert report["residual"] == "sylvester(4) ⊗ paley1(q=11)"
    assert report["intermediate"] == {"108": "paley1(q=107)"}
    assert report["random_orthogonal_fallbacks"] == ["heads (3)"]
    assert "random orthogonal" in caplog.text


@pytest.mark.skipif(not family_available("molmo2"), reason="this transformers lacks the molmo2 model class")
def test_full_width_qk_norm_stays_exact():
    model = _custom("molmo2", qk_norm_type="olmo")
    assert type(model.model.language_model.layers[0].self_attn.q_norm.weight.shape[0]) is int
    assert model.model.language_model.layers[0].self_attn.q_norm.weight.shape[0] == 64  # over all heads
    err, _ = _rotated_error(model, "molmo2", "wsvd")
    assert err < EXACT


def _tied_llava():
    config = tiny_config("llava")
    config.tie_word_embeddings = True
    config.get_text_config().tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class_for(config)._from_config(config, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return with_gains(model)


def test_tied_embeddings_are_untied():
    model = _tied_llava()
    err, result = _rotated_error(model, "llava", "svd")
    assert err < EXACT
    assert result.report["quantize"]["hadamard"]["untied_embeddings"] is True
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert model.config.get_text_config().tie_word_embeddings is False


def test_tied_embeddings_without_untying_is_an_error():
    model = _tied_llava()
    with pytest.raises(LowRankError, match="ties its input and output embeddings.*untie_embeddings: true"):
        quantize(
            model, "llava", "w8a8", methods=["hadamard"], params={"hadamard": {"untie_embeddings": False}}
        )


@pytest.mark.skipif(not family_available("molmo2"), reason="this transformers lacks the molmo2 model class")
def test_post_norm_models_are_refused():
    model = _custom("molmo2", norm_after=True)
    with pytest.raises(LowRankError, match=r"normalizes after each block \(norm_after\)"):
        quantize(model, "molmo2", "w8a8", methods=["hadamard"])


def test_rotating_a_quantized_model_is_an_error():
    model = tiny("llava")
    quantize(model, "llava", "w8a16")
    with pytest.raises(LowRankError, match="hadamard: the model is already quantized"):
        quantize(model, "llava", "w8a8", methods=["hadamard"])


def test_a_norm_that_is_not_rms_is_refused():
    model = tiny("llava")
    layer = model.model.language_model.layers[0]
    layer.input_layernorm = torch.nn.LayerNorm(64, bias=False)
    with pytest.raises(LowRankError, match="layer 0 input norm .*LayerNorm.* does not behave as an RMSNorm"):
        quantize(model, "llava", "w8a8", methods=["hadamard"], calibration=samples(tiny("llava")))
