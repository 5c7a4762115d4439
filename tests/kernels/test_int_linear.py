"""Integer linears: the Triton weight-only kernel (under TRITON_INTERPRET=1 on the CPU) and the backend
choice against the naive twin; quantized modules keep no float copy of their integers."""

import os

import pytest
import torch

from lowrank_kit.kernels.int_linear import ENV, choose_backend, dequantize, int_linear, naive_int_linear
from lowrank_kit.quant.modules import QuantLinear, QuantPerHeadLowRankLinear
from lowrank_kit.quant.primitives import pack, quantize_tokens
from lowrank_kit.quant.report import held_tensor_bytes as tensor_bytes

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernel runs on the CPU only interpreted"
)


def problem(m, n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    lim = 127 if bits == 8 else 7
    q = torch.randint(-lim - (bits == 4), lim + 1, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.02 + 0.001
    x = torch.randn(m, k, generator=g)
    return x, pack(q, bits), scale, q


@pytest.mark.parametrize("bits", [8, 4])
def test_naive_is_the_dense_product(bits):
    x, stored, scale, q = problem(5, 24, 33, bits)
    want = x.double() @ (q.double() * scale.double()[:, None]).T
    got = naive_int_linear(x, stored, scale, bits, 33)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        dequantize(stored, scale, bits, 33, torch.float64), q.double() * scale.double()[:, None]
    )


@interpreted
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m,n,k", [(1, 16, 32), (3, 40, 70), (20, 33, 45)])
def test_triton_kernel_matches_naive(bits, m, n, k):
    # Odd K exercises the padded nibble of int4; M, N and K off the tile sizes exercise the masks.
    x, stored, scale, _ = problem(m, n, k, bits, seed=m + n + k)
    want = naive_int_linear(x, stored, scale, bits, k)
    got = int_linear(x, stored, scale, bits, k, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@interpreted
def test_triton_kernel_keeps_leading_dims_and_reads_a_strided_input():
    _, stored, scale, _ = problem(6, 16, 32, 8)
    x3 = torch.randn(2, 3, 64)[..., ::2]  # last-dim stride 2
    want = naive_int_linear(x3.contiguous(), stored, scale, 8, 32)
    got = int_linear(x3, stored, scale, 8, 32, backend="triton")
    assert got.shape == (2, 3, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backend_choice_and_forced_backends(monkeypatch):
    x = torch.randn(32, 64)
    monkeypatch.delenv(ENV, raising=False)
    assert choose_backend(x, 8, 64, int8_activations=True) == "naive"  # the CPU never runs int_mm
    monkeypatch.setenv(ENV, "int_mm")
    with pytest.raises(ValueError, match="int_mm needs CUDA"):
        choose_backend(x, 8, 64, int8_activations=True)
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(
        ValueError, match="'fast' is not an integer-linear backend; valid: auto, naive, triton, int_mm"
    ):
        choose_backend(x, 8, 64, int8_activations=False)
    monkeypatch.setenv(ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton needs CUDA tensors"):
        choose_backend(x, 8, 64, int8_activations=False)


def test_per_token_quantization_is_what_fake_quant_rounds_to():
    from lowrank_kit.quant.primitives import fake_quant_tokens

    x = torch.randn(4, 7, 48)
    q, s = quantize_tokens(x, 8, 0.9)
    assert q.dtype == torch.int8 and s.shape == (4, 7, 1)
    torch.testing.assert_close(q.float() * s, fake_quant_tokens(x, 8, 0.9), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quant_linear_holds_its_integers_only_after_a_forward(bits):
    lin = torch.nn.Linear(64, 48, bias=False)
    q = torch.randint(-7, 8, (48, 64), dtype=torch.int8)
    mod = QuantLinear.from_linear(lin, q=q, scale=torch.rand(48), weight_bits=bits)
    before = tensor_bytes(mod)
    assert before == 48 * 64 * bits // 8 + 48 * 4
    mod(torch.randn(3, 64))
    assert tensor_bytes(mod) == before


def test_a_quantized_per_head_projection_holds_no_float_up_weight_after_a_forward():
    from lowrank_kit.modules import PerHeadLowRankLinear

    base = PerHeadLowRankLinear(32, 8, [3, 5], bias=False)
    down = QuantLinear.from_linear(
        base.down, q=torch.zeros(8, 32, dtype=torch.int8), scale=torch.ones(8), weight_bits=8
    )
    mod = QuantPerHeadLowRankLinear.from_module(
        base,
        q=torch.ones(8, 8, dtype=torch.int8),
        scale=torch.ones(2, 8),
        up_bits=8,
        down=down,
        up_input_quant=None,
    )
    before = tensor_bytes(mod)
    mod(torch.randn(2, 32))
    assert tensor_bytes(mod) == before


@interpreted
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m,n,k", [(1, 16, 32), (5, 40, 70)])
def test_swapped_kernel_matches_naive(bits, m, n, k):
    from lowrank_kit.kernels.int_linear.triton import IntLinearConfig
    from lowrank_kit.kernels.int_linear.triton import int_linear as triton_int_linear

    x, stored, scale, _ = problem(m, n, k, bits, seed=7 + m)
    want = naive_int_linear(x, stored, scale, bits, k)
    got = triton_int_linear(x, stored, scale, bits, k, IntLinearConfig(16, 16, 32, 1, 1, swapped=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("swapped", [False, True])
@pytest.mark.parametrize("split_k,k", [(2, 70), (3, 96), (8, 40)])
def test_split_k_kernel_matches_naive(bits, swapped, split_k, k):
    # K chunks that do not divide K, and more splits asked than K tiles (8 splits of 2 tiles -> 2).
    from lowrank_kit.kernels.int_linear.triton import IntLinearConfig
    from lowrank_kit.kernels.int_linear.triton import int_linear as triton_int_linear

    x, stored, scale, _ = problem(5, 24, k, bits, seed=split_k + k)
    want = naive_int_linear(x, stored, scale, bits, k)
    cfg = IntLinearConfig(16, 16, 32, 1, 1, swapped=swapped, split_k=split_k)
    got = triton_int_linear(x, stored, scale, bits, k, cfg)
    assert got.dtype == x.dtype and got.shape == (5, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
