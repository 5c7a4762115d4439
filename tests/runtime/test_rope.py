"""RoPE as the latent path rebuilds it equals transformers' rotary embedding, and decode follows it."""

import pytest
import torch
from runtime_helpers import (
    assert_same_generation,
    compress_model,
    greedy,
    model_from_config,
    padded_batch,
)

from lowrank_kit.models.families.molmo2 import molmo2_attention_info
from lowrank_kit.models.tiny import family_available, tiny_config
from lowrank_kit.registry import adapter_for_config
from lowrank_kit.runtime import LatentDecodeError, enable_latent_decode
from lowrank_kit.runtime.rope import rope_spec

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
    },
}
needs_molmo2 = pytest.mark.skipif(
    not family_available("molmo2"), reason="this transformers lacks the molmo2 model class"
)


def llava_with_rope(params: dict):
    config = tiny_config("llava")
    config.text_config.rope_parameters = dict(params)
    return model_from_config(config)


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rope_spec_equals_the_models_rotary_embedding(kind):
    model = llava_with_rope(ROPES[kind])
    adapter = adapter_for_config(model.config)
    rotary = model.model.language_model.rotary_emb
    spec = rope_spec(model.config.text_config, adapter.info(model), 0)
    torch.testing.assert_close(spec.inv_freq, rotary.inv_freq.float(), rtol=0, atol=0)
    assert spec.attention_factor == pytest.approx(float(rotary.attention_scaling), rel=0, abs=0)
    assert spec.mrope_section is None


@pytest.mark.parametrize("kind", ["llama3", "yarn"])
def test_generate_with_scaled_rope(kind):
    """yarn's attention factor (≠ 1) multiplies cos and sin of both q and the rebuilt keys."""
    model = compress_model(llava_with_rope(ROPES[kind]), "llava", "wsvd")
    inputs = padded_batch(model)
    ref = greedy(model, inputs)
    enable_latent_decode(model)
    assert_same_generation(ref, greedy(model, inputs))


def test_mrope_sections_and_frequencies():
    model = model_from_config(tiny_config("qwen2_vl"))
    rotary = model.model.language_model.rotary_emb
    spec = rope_spec(model.config.text_config, adapter_for_config(model.config).info(model), 1)
    assert spec.mrope_section == tuple(rotary.mrope_section) == (2, 3, 3)
    assert spec.num_positions == 3
    torch.testing.assert_close(spec.inv_freq, rotary.inv_freq.float(), rtol=0, atol=0)


@needs_molmo2
def test_molmo2_scaled_rope_on_selected_layers_only():
    config = tiny_config("molmo2")
    config.text_config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    config.text_config.rope_scaling_layers = [1]
    model = model_from_config(config)
    info = molmo2_attention_info(model.config)
    lm = model.model.language_model
    for layer, rotary in ((0, lm.rotary_emb_unscaled), (1, lm.rotary_emb)):
        spec = rope_spec(config.text_config, info, layer)
        torch.testing.assert_close(spec.inv_freq, rotary.inv_freq.float(), rtol=0, atol=0)
    assert not torch.equal(
        rope_spec(config.text_config, info, 0).inv_freq, rope_spec(config.text_config, info, 1).inv_freq
    )
    model = compress_model(model, "molmo2", "svd")
    inputs = padded_batch(model)
    ref = greedy(model, inputs)
    enable_latent_decode(model)
    assert_same_generation(ref, greedy(model, inputs))


@needs_molmo2
def test_molmo2_full_width_qk_norm():
    """OLMo-style QK-norm: one RMSNorm over all KV heads, one 1/rms per token in the cache."""
    config = tiny_config("molmo2")
    config.text_config.qk_norm_type = "olmo"
    model = compress_model(model_from_config(config), "molmo2", "wsvd")
    inputs = padded_batch(model)
    ref = greedy(model, inputs)
    enable_latent_decode(model)
    out = greedy(model, inputs)
    assert_same_generation(ref, out)
    from runtime_helpers import cache_of

    assert cache_of(out).layers[0].k_norm.shape[-1] == 1


@needs_molmo2
@pytest.mark.parametrize("norm_type", ["qwen3", "olmo"])
def test_molmo2_qk_norm_with_k_bias(norm_type, monkeypatch):
    """K bias under QK-norm: the gain multiplies the bias too (``g ⊙ (x U + b) / rms``), and the cached
    1/rms is that of the biased key. No tiny family has both, so the config asks for attention biases."""
    from runtime_helpers import DecodeCalls, cache_of, decode_steps

    config = tiny_config("molmo2")
    config.text_config.attention_bias = True
    config.text_config.qk_norm_type = norm_type
    model = compress_model(model_from_config(config), "molmo2", "wsvd")
    k_proj = model.model.language_model.layers[0].self_attn.k_proj
    assert k_proj.bias is not None and float(k_proj.bias.detach().abs().max()) > 0.1
    inputs = padded_batch(model)
    ref = greedy(model, inputs)
    enable_latent_decode(model)
    calls = DecodeCalls(monkeypatch)
    out = greedy(model, inputs)
    assert calls.naive == decode_steps(model, out)
    assert cache_of(out).layers[0].k_norm.shape[-1] == (2 if norm_type == "qwen3" else 1)
    assert_same_generation(ref, out)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, "rope_type 'dynamic'"),
        (
            {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            "partial_rotary_factor 0.5",
        ),
    ],
)
def test_unsupported_rope_is_refused(params, match):
    model = compress_model(llava_with_rope(ROPES["default"]), "llava", "svd")
    model.config.text_config.rope_parameters = dict(params)
    with pytest.raises(LatentDecodeError, match=match):
        enable_latent_decode(model)
