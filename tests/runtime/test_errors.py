"""Every way a user can ask the latent runtime for something it cannot do: one clear error."""

import pytest
import torch
from runtime_helpers import compress_model, compressed_tiny, greedy, model_from_config, padded_batch
from transformers.cache_utils import DynamicCache

from lowrank_kit.errors import LowRankError
from lowrank_kit.models.tiny import build_tiny_model, family_available, tiny_config
from lowrank_kit.runtime import LatentDecodeError, LatentLayer, enable_latent_decode
from lowrank_kit.runtime.attention import PositionTap


def test_error_is_a_lowrank_error():
    assert issubclass(LatentDecodeError, LowRankError)


def test_uncompressed_model_is_refused():
    with pytest.raises(
        LatentDecodeError, match=r"needs low-rank K and V projections, but layer 0 k_proj is a Linear"
    ):
        enable_latent_decode(build_tiny_model("llava"))


def test_model_with_only_q_compressed_is_refused():
    model = compressed_tiny("llava", "svd", targets=["q_proj"])
    with pytest.raises(LatentDecodeError, match=r"layer 0 k_proj is a Linear"):
        enable_latent_decode(model)


def test_only_k_compressed_names_v():
    model = compressed_tiny("qwen2_vl", "wsvd", targets=["q_proj", "k_proj"])
    with pytest.raises(LatentDecodeError, match=r"layer 0 v_proj is a Linear"):
        enable_latent_decode(model)


def test_sliding_window_is_refused():
    config = tiny_config("qwen2_vl")
    text = config.text_config.to_dict()
    text.update(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    text.pop("layer_types", None)
    config.text_config = type(config.text_config)(**text)
    model = compress_model(model_from_config(config), "qwen2_vl", "svd")
    with pytest.raises(LatentDecodeError, match=r"layer 0 uses sliding_attention attention .*not supported"):
        enable_latent_decode(model)


def test_head_dim_must_be_a_power_of_two():
    config = tiny_config("llava")
    config.text_config.head_dim = 24
    with pytest.raises(LatentDecodeError, match=r"head_dim 24 is not a power of two"):
        enable_latent_decode(model_from_config(config))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "cuda"}, r"unknown latent-attention backend 'cuda'; available: auto, naive, triton"),
        ({"chunk": 0}, r"chunk must be at least 1 cache slot, got 0"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(LatentDecodeError, match=match):
        enable_latent_decode(compressed_tiny("llava", "svd"), **kwargs)


def test_bad_kv_bits():
    model = compressed_tiny("llava", "wsvd")
    model.model.language_model.layers[1].self_attn.k_proj.kv_bits = 3
    with pytest.raises(
        LatentDecodeError, match=r"layer 1 k_proj has kv_bits=3; latent decode stores 8, 4-bit"
    ):
        enable_latent_decode(model)


def test_k_and_v_bits_must_match():
    model = compressed_tiny("llava", "wsvd")
    model.model.language_model.layers[0].self_attn.k_proj.kv_bits = 8
    with pytest.raises(LatentDecodeError, match=r"k_proj stores 8-bit latents and v_proj 16-bit ones"):
        enable_latent_decode(model)


@pytest.mark.skipif(not family_available("molmo2"), reason="this transformers lacks the molmo2 model class")
@pytest.mark.parametrize(
    ("norm", "match"),
    [
        (lambda w: torch.nn.LayerNorm(w), r"layer 0 k_norm \(LayerNorm\) does not compute g ⊙ x / sqrt"),
        (lambda w: torch.nn.Identity(), r"layer 0 k_norm \(Identity\) is not an RMSNorm of width 16"),
    ],
)
def test_qk_norm_that_is_not_rmsnorm_is_refused(norm, match):
    model = compressed_tiny("molmo2", "svd")
    attn = model.model.language_model.layers[0].self_attn
    attn.k_norm = norm(attn.k_norm.weight.numel())
    with pytest.raises(LatentDecodeError, match=match):
        enable_latent_decode(model)


def test_right_padding_is_refused():
    model = compressed_tiny("llava", "svd")
    inputs = padded_batch(model)
    inputs["attention_mask"] = inputs["attention_mask"].flip(-1)  # row 0's padding at the end
    enable_latent_decode(model)
    with pytest.raises(LatentDecodeError, match=r"batch row 0 .*left padding only"):
        greedy(model, inputs, n=2)


def test_filled_ordinary_cache_is_refused():
    model = compressed_tiny("llava", "svd")
    inputs = padded_batch(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**inputs, past_key_values=cache, use_cache=True)
    enable_latent_decode(model)
    with pytest.raises(
        LatentDecodeError, match=r"layer 0 of the cache is a DynamicLayer with \d+ tokens of K/V"
    ):
        greedy(model, inputs, n=2, past_key_values=cache)


def test_a_cache_that_is_not_a_cache_is_refused():
    model = compressed_tiny("llava", "svd")
    enable_latent_decode(model)
    attn = model.model.language_model.layers[0].self_attn
    x = torch.zeros(1, 3, 64)
    cos = sin = torch.zeros(1, 3, 16)
    with pytest.raises(LatentDecodeError, match=r"needs a transformers Cache, got tuple"):
        attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None, cache=())


def test_attention_module_alone_has_no_positions():
    model = compressed_tiny("llava", "svd")
    enable_latent_decode(model)
    attn = model.model.language_model.layers[0].self_attn
    x = torch.zeros(1, 3, 64)
    cos = sin = torch.zeros(1, 3, 16)
    with pytest.raises(LatentDecodeError, match=r"no position ids were seen for this forward"):
        attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)


def test_output_attentions_is_refused():
    model = compressed_tiny("llava", "svd")
    enable_latent_decode(model)
    with pytest.raises(LatentDecodeError, match=r"does not materialize attention weights"), torch.no_grad():
        model(**padded_batch(model), output_attentions=True)


def test_position_components_must_fit_the_rope():
    tap = PositionTap()
    tap.set(torch.zeros(3, 1, 4, dtype=torch.long))
    with pytest.raises(
        LatentDecodeError, match=r"position ids have 3 components but the layer's RoPE takes 2"
    ):
        tap.token_positions(1, 4, 2)
    with pytest.raises(LatentDecodeError, match=r"do not match the 2×5 tokens"):
        tap.token_positions(2, 5, 3)


def test_latent_layer_takes_no_key_value_states():
    with pytest.raises(LatentDecodeError, match=r"holds latents and cannot take K/V states"):
        LatentLayer().update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(LatentDecodeError, match=r"chunks of at least 1 slot, got chunk=0"):
        LatentLayer(chunk=0)
