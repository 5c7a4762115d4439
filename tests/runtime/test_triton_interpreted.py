"""A short generate through the Triton kernel itself, interpreted on the CPU (small shapes, fp32).

On a GPU the compiled kernel is exercised by test_generate_gpu.py in 16 bits (fp32 dots would run as
TF32 there, which this file's fp32 tolerance is not meant for)."""

import os

import pytest
from runtime_helpers import (
    FP32_TOL,
    DecodeCalls,
    assert_same_generation,
    compressed_tiny,
    decode_steps,
    fake_quant_forward,
    greedy,
    padded_batch,
    set_bits,
)

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
