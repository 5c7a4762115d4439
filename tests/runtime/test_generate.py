"""Greedy generate from latents equals the same compressed model with transformers' ordinary cache.

Every tiny family × every decomposer, fp32, a batch of two rows of different prompt lengths (left
padding), image inputs. The latent path runs on the CPU through the kernel's PyTorch twin, the same
code path that runs the Triton kernel on CUDA.
"""

import pytest
import torch
from runtime_helpers import (
    FAMILIES,
    METHODS,
    DecodeCalls,
    assert_same_generation,
    cache_of,
    compressed_tiny,
    decode_steps,
    greedy,
    padded_batch,
    rel,
)
from transformers.cache_utils import DynamicCache, DynamicLayer

from lowrank_kit.models.tiny import tiny_inputs
from lowrank_kit.runtime import (
    LatentCache,
    LatentLayer,
    disable_latent_decode,
    enable_latent_decode,
    latent_decode_enabled,
)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_ordinary_cache(family, method, monkeypatch):
    model = compressed_tiny(family, method)
    inputs = padded_batch(model)
    ref = greedy(model, inputs)
    assert all(type(layer) is DynamicLayer for layer in cache_of(ref).layers)
    assert enable_latent_decode(model) is model
    calls = DecodeCalls(monkeypatch)
    out = greedy(model, inputs)
    # Every token after the first went through the kernel entry point, which ran the PyTorch twin here.
    assert calls.calls == calls.naive == decode_steps(model, out) > 0
    assert set(calls.backends) == {"auto"}
    layers = cache_of(out).layers
    assert len(layers) == model.config.get_text_config().num_hidden_layers
    assert all(isinstance(layer, LatentLayer) for layer in layers)
    total = inputs["input_ids"].shape[1] + len(out.logits) - 1  # the last token is never fed back
    assert all(layer.length == total for layer in layers)
    assert cache_of(out).layers[0].starts.tolist() == [2, 0]  # row 0 is left-padded by two tokens
    assert_same_generation(ref, out)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_per_head_latents_with_ragged_ranks(family):
    """wsvd's importance allocation gives heads different ranks; the cache stores each at its own width:
    head j's latent at the sum of the earlier heads' ranks, each rounded up to 16 bytes (4 fp32)."""
    model = compressed_tiny(family, "wsvd", ratio=0.5)
    layers = model.model.language_model.layers
    assert any(len(set(layer.self_attn.k_proj.ranks)) > 1 for layer in layers), "expected ragged ranks"
    inputs = padded_batch(model, pad=3)
    ref = greedy(model, inputs)
    seen = {}

    def keep_prefill_input(i):
        def hook(_module, _args, kwargs):
            seen.setdefault(i, kwargs["hidden_states"])

        return hook

    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_pre_hook(keep_prefill_input(i), with_kwargs=True)
    enable_latent_decode(model)
    out = greedy(model, inputs)
    assert_same_generation(ref, out)
    n = inputs["input_ids"].shape[1]
    for i, layer in enumerate(layers):
        cached = cache_of(out).layers[i]
        for name, stored in (("k_proj", cached.k), ("v_proj", cached.v)):
            mod = getattr(layer.self_attn, name)
            latent = mod.latent(seen[i]).detach()  # [B, n, Σ ranks], head after head
            col, expected = 0, torch.zeros(stored.shape[0], n, stored.shape[-1])
            for j, r in enumerate(mod.ranks):
                lo = sum(mod.ranks[:j])
                expected[..., col : col + r] = latent[..., lo : lo + r]
                col += -(-r // 4) * 4
            assert stored.shape[-1] == -(-col // 16) * 16, (name, mod.ranks, stored.shape)
            torch.testing.assert_close(stored[:, :n], expected, rtol=0, atol=0)
            # Decode steps write only their latents' columns; the padding columns stay zero.
            padding = torch.ones(stored.shape[-1], dtype=torch.bool)
            col = 0
            for r in mod.ranks:
                padding[col : col + r] = False
                col += -(-r // 4) * 4
            decoded = stored[:, n : cached.length]
            assert decoded.shape[1] > 0 and decoded[..., ~padding].abs().sum() > 0
            assert torch.equal(decoded[..., padding], torch.zeros_like(decoded[..., padding]))


def test_joint_latent_is_cached_once():
    model = compressed_tiny("llava", "qsvd")
    enable_latent_decode(model)
    out = greedy(model, padded_batch(model), n=2)
    for layer in cache_of(out).layers:
        assert layer.v is layer.k
        assert layer.format.v_width is None


def test_explicit_latent_cache_and_disable():
    model = compressed_tiny("llava", "svd")
    inputs = padded_batch(model)
    ref = greedy(model, inputs)
    enable_latent_decode(model)
    assert latent_decode_enabled(model)
    total = inputs["input_ids"].shape[1] + len(ref.logits) - 1
    out = greedy(model, inputs, past_key_values=LatentCache(chunk=4, max_length=total))
    assert_same_generation(ref, out)
    assert isinstance(cache_of(out), LatentCache)
    # Layers made by the attention take the cache's chunk and max_length: allocated once, for all tokens.
    assert all(layer.capacity == -(-total // 4) * 4 for layer in cache_of(out).layers)
    disable_latent_decode(model)
    assert not latent_decode_enabled(model)
    again = greedy(model, inputs)
    assert all(type(layer) is DynamicLayer for layer in cache_of(again).layers)
    assert_same_generation(ref, again)


def test_enable_twice_rebuilds_from_current_weights():
    model = compressed_tiny("llava", "svd")
    enable_latent_decode(model)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.k_proj.up.weight.mul_(1.5)
    stale = greedy(model, padded_batch(model))
    enable_latent_decode(model)  # re-reads the up-projections
    fresh = greedy(model, padded_batch(model))
    disable_latent_decode(model)
    ref = greedy(model, padded_batch(model))
    assert_same_generation(ref, fresh)
    assert rel(stale.logits[1], ref.logits[1]) > 1e-3


def test_forward_without_cache_matches():
    """use_cache=False: one forward over the prompt through the latent path (a throwaway cache)."""
    model = compressed_tiny("qwen2_vl", "wsvd")
    inputs = padded_batch(model)
    with torch.no_grad():
        ref = model(**inputs, use_cache=False).logits
        enable_latent_decode(model)
        out = model(**inputs, use_cache=False).logits
    assert rel(out, ref) < 1e-5


def test_chunked_continuation_of_a_cache():
    """A second forward of several tokens onto a filled latent cache (extend, not decode) attends to all."""
    model = compressed_tiny("llava", "wsvd")
    inputs = tiny_inputs(model, batch=1, seed=5)
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    extra = torch.randint(4, 200, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, extra], 1), **inputs).logits[:, -5:]
        enable_latent_decode(model)
        cache = LatentCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True, **inputs)
        part = model(input_ids=extra, past_key_values=cache, use_cache=True).logits
    assert rel(part, full) < 1e-5


def test_default_dynamic_cache_layers_become_latent():
    model = compressed_tiny("llava", "svd")
    enable_latent_decode(model)
    cache = DynamicCache(config=model.config)
    greedy(model, padded_batch(model), n=2, past_key_values=cache)
    assert all(isinstance(layer, LatentLayer) for layer in cache.layers)
    assert cache.get_seq_length() == padded_batch(model)["input_ids"].shape[1] + 1


def test_beam_search_reorders_the_latent_cache():
    model = compressed_tiny("llava", "svd")
    inputs = padded_batch(model)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False, early_stopping=False)
    with torch.no_grad():
        ref = model.generate(**inputs, **kwargs)
        enable_latent_decode(model)
        out = model.generate(**inputs, **kwargs)
    assert torch.equal(out, ref)
