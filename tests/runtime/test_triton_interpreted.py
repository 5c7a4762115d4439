"""A short generate through the Triton kernel itself, interpreted on the CPU (small shapes, fp32).

On a GPU the compiled kernel is exercised by test_generate_gpu.py in 16 bits (fp32 dots would run as
TF32 there, which this file's fp32 tolerance is not meant for)."""

import os

import pytest
from runtime_helpers import (
    FP32_TOL,
    DecodeCalls,
    assert_same_generation,
    compress_model,
    compressed_tiny,
    count_heads_kernel,
    decode_steps,
    fake_quant_forward,
    greedy,
    mha_config,
    model_from_config,
    padded_batch,
    set_bits,
)

from lowrank_kit.models.tiny import tiny_config
from lowrank_kit.runtime import enable_latent_decode

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the interpreted kernel (TRITON_INTERPRET=1, set by tests/conftest.py on machines without CUDA); "
    "the compiled kernel is tested by test_generate_gpu.py",
)


@pytest.mark.parametrize(
    ("family", "method", "bits"), [("llava", "wsvd", None), ("qwen2_vl", "wsvd", 8), ("llava", "qsvd", None)]
)
def test_generate_through_the_triton_kernel(family, method, bits, monkeypatch):
    model = compressed_tiny(family, method, ratio=0.5)
    inputs = padded_batch(model, pad=3)
    if bits is not None:
        mods = set_bits(model, bits)
        fake_quant_forward(mods, bits)
        ref = greedy(model, inputs, n=3)
        for mod in mods:
            del mod.forward
    else:
        ref = greedy(model, inputs, n=3)
    enable_latent_decode(model, backend="triton")
    calls = DecodeCalls(monkeypatch)
    out = greedy(model, inputs, n=3)
    assert calls.calls == decode_steps(model, out) > 0 and set(calls.backends) == {"triton"}
    assert calls.naive == 0
    # fp32 everywhere (the interpreter's dots are fp32 numpy products): the same tolerance as the twin.
    assert_same_generation(ref, out, FP32_TOL)


@pytest.mark.parametrize(("family", "bits"), [("llava", None), ("qwen2_vl", 8)])
def test_generate_through_the_per_head_kernel(family, bits, monkeypatch):
    """MHA with per-head latents (wsvd): the per-head kernel, with M-RoPE, K bias and int8 latents on
    Qwen2-VL."""
    model = compress_model(model_from_config(mha_config(tiny_config(family))), family, "wsvd", ratio=0.5)
    inputs = padded_batch(model, pad=3)
    mods = set_bits(model, bits) if bits is not None else []
    if bits is not None:
        fake_quant_forward(mods, bits)
    ref = greedy(model, inputs, n=3)
    for mod in mods:
        del mod.forward
    enable_latent_decode(model, backend="triton")
    calls = DecodeCalls(monkeypatch)
    heads = count_heads_kernel(monkeypatch)
    out = greedy(model, inputs, n=3)
    steps = decode_steps(model, out)
    assert calls.calls == steps > 0 and set(calls.backends) == {"triton"}
    layers = model.config.get_text_config().num_hidden_layers
    assert heads["heads"] == calls.calls, f"{heads['heads']} per-head launches for {calls.calls} decode calls"
    assert calls.calls % layers == 0
    assert_same_generation(ref, out, FP32_TOL)
