"""Quantized latents: modules with ``kv_bits`` are cached as int8 (4-bit values one per byte) with
per-(token, group) scales, and decode equals an ordinary-cache model whose K/V latents are fake-quantized
the same way."""

import pytest
import torch
from runtime_helpers import (
    FP32_TOL,
    DecodeCalls,
    assert_same_generation,
    cache_of,
    compressed_tiny,
    decode_steps,
    fake_quant_forward,
    greedy,
    padded_batch,
    set_bits,
)

from lowrank_kit.kernels.latent_attention import LatentLayout, align_for, quantize_int8
from lowrank_kit.models.tiny import family_available
from lowrank_kit.runtime import LatentCache, enable_latent_decode
from lowrank_kit.runtime.convert import _quant_tables, quantize_latents


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    ("family", "method"),
    [("llava", "wsvd"), ("qwen2_vl", "wsvd"), ("qwen2_vl", "svd"), ("llava", "qsvd"), ("molmo2", "wsvd")],
)
def test_quantized_latents_match_fake_quant_reference(family, method, bits, monkeypatch):
    if not family_available(family):
        pytest.skip(f"this transformers lacks the {family} model class")
    model = compressed_tiny(family, method)
    mods = set_bits(model, bits)
    inputs = padded_batch(model)
    fake_quant_forward(mods, bits)
    ref = greedy(model, inputs)
    for mod in mods:
        del mod.forward
    enable_latent_decode(model)
    calls = DecodeCalls(monkeypatch)
    out = greedy(model, inputs)
    assert calls.naive == decode_steps(model, out) > 0
    layer = cache_of(out).layers[0]
    assert layer.k.dtype == torch.int8 and layer.k_scale.dtype == torch.float32
    assert int(layer.k[:, : layer.length].abs().max()) <= 2 ** (bits - 1) - 1
    # Same roundings on both sides (the fake-quant reference and the kernel's dequantization in fp32).
    assert_same_generation(ref, out, FP32_TOL)


def test_int8_storage_is_the_kernels_quantize_int8():
    model = compressed_tiny("qwen2_vl", "wsvd", ratio=0.5)
    set_bits(model, 8)
    attn = model.model.language_model.layers[1].self_attn
    seen = []
    handle = attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"]), with_kwargs=True
    )
    enable_latent_decode(model)
    cache = LatentCache()
    with torch.no_grad():
        model(**padded_batch(model), past_key_values=cache, use_cache=True)
    handle.remove()
    x = seen[0]
    for name, stored, scale in (
        ("k_proj", cache.layers[1].k, cache.layers[1].k_scale),
        ("v_proj", None, None),
    ):
        mod = getattr(attn, name)
        layout = LatentLayout.per_head(mod.ranks, align_for(torch.int8))
        want_q, want_s = quantize_int8(layout.pack(mod.latent(x).detach()), layout)
        stored = cache.layers[1].v if stored is None else stored
        scale = cache.layers[1].v_scale if scale is None else scale
        n = x.shape[1]
        assert torch.equal(stored[:, :n], want_q), name
        assert torch.equal(scale[:, :n], want_s), name


@pytest.mark.parametrize("layout", ["per_head", "shared"])
def test_vectorized_quantization_equals_quantize_int8(layout):
    gen = torch.Generator().manual_seed(0)
    lay = LatentLayout.per_head([17, 48, 5], 16) if layout == "per_head" else LatentLayout.shared(33, 3, 16)
    packed = lay.pack(torch.randn(2, 7, lay.latent_width, generator=gen))
    packed[0, 3] = 0  # an all-zero token: scale 1, values 0
    q, s = quantize_latents(packed, _quant_tables(lay, torch.device("cpu")), 8)
    want_q, want_s = quantize_int8(packed, lay)
    assert torch.equal(q, want_q) and torch.equal(s, want_s)


@pytest.mark.parametrize(
    ("family", "method", "scheme"),
    [
        ("llava", "wsvd", "w8a8"),
        ("llava", "wsvd", "w8a8-kv8"),
        ("qwen2_vl", "wsvd", "w4a4-kv4"),
        ("llava", "svd", "w4a4-kv4"),
        ("qwen2_vl", "qsvd", "w8a8-kv8"),
        ("smolvlm", "svdllm", "w4a16"),
    ],
)
def test_quantized_model_decodes_like_its_fake_quant_forward(family, method, scheme):
    """Models from the quantization engine: ``-kvN`` latents are cached as integers, and without it the
    latent is cached after the up-projection's own input fake quantization, so decode reads what
    ``up`` reads in the ordinary forward."""
    model = compressed_tiny(family, method, scheme=scheme)
    inputs = padded_batch(model)
    ref = greedy(model, inputs)
    enable_latent_decode(model)
    out = greedy(model, inputs)
    kv = "-kv" in scheme
    assert (cache_of(out).layers[0].k.dtype == torch.int8) == kv
    # fp32 on both sides; the fake quantizations round identical values (prefill is bit-exact), so only
    # attention summation order differs, as in the unquantized comparison.
    assert_same_generation(ref, out, FP32_TOL)
