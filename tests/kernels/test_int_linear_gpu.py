"""Integer linears on a CUDA GPU: the compiled Triton kernel and torch._int_mm against the naive twin at
real layer shapes, and a quantized model computing from its integers agrees with the CPU path."""

import pytest
import torch

from lowrank_kit.kernels.int_linear import int8_linear, int_linear, naive_int_linear
from lowrank_kit.quant.primitives import pack, quantize_tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to run the compiled kernels"),
]

# LLaVA-NeXT-7B's linears (q/o 4096², MLP 4096↔11008) and a low-rank factor (4096 → 2048).
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (2048, 4096)]


def problem(m, n, k, bits, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lim = 127 if bits == 8 else 7
    q = torch.randint(-lim, lim + 1, (n, k), generator=g, device="cuda", dtype=torch.int8)
    scale = torch.rand(n, generator=g, device="cuda") * 0.01 + 1e-3
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    return x, pack(q, bits), scale


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 8, 33, 512])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_weight_only_matches_naive(bits, m, n, k, dtype):
    x, stored, scale = problem(m, n, k, bits, dtype, seed=m + n)
    want = naive_int_linear(x.float(), stored, scale, bits, k)  # fp32 reference
    got = int_linear(x, stored, scale, bits, k, backend="triton")
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel(got, want) < (2e-3 if dtype == torch.float16 else 1e-2)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("swapped", [False, True])
@pytest.mark.parametrize("split_k", [2, 4, 8])
@pytest.mark.parametrize("n,k", SHAPES)
def test_split_k_and_swapped_launches_match_naive(bits, swapped, split_k, n, k):
    from lowrank_kit.kernels.int_linear.triton import IntLinearConfig
    from lowrank_kit.kernels.int_linear.triton import int_linear as triton_int_linear

    x, stored, scale = problem(8, n, k, bits, torch.float16, seed=split_k + n)
    want = naive_int_linear(x.float(), stored, scale, bits, k)
    cfg = IntLinearConfig(16, 64 if swapped else 32, 128, 4, 3, swapped=swapped, split_k=split_k)
    got = triton_int_linear(x, stored, scale, bits, k, cfg)
    assert got.dtype == torch.float16 and got.shape == (8, n)
    assert rel(got, want) < 2e-3


def test_triton_fp32_is_not_tf32():
    x, stored, scale = problem(8, 4096, 4096, 8, torch.float32)
    want = naive_int_linear(x.double(), stored, scale.double(), 8, 4096)
    assert rel(int_linear(x, stored, scale, 8, 4096, backend="triton"), want) < 1e-5


@pytest.mark.parametrize("m", [17, 512, 4096])
@pytest.mark.parametrize("n,k", SHAPES)
def test_int_mm_matches_fake_quant_then_naive(m, n, k):
    x, stored, scale = problem(m, n, k, 8, torch.float16, seed=m)
    xq, xs = quantize_tokens(x, 8, 0.9)
    got = int8_linear(xq, xs, stored, scale, torch.float16)
    want = naive_int_linear((xq.float() * xs), stored, scale, 8, k)  # exact integers, fp32 scales
    assert rel(got, want) < 2e-3


def test_a_quantized_model_on_the_gpu_agrees_with_the_cpu_and_keeps_no_float_copy():
    from lowrank_kit.models.tiny import build_tiny_model, tiny_inputs
    from lowrank_kit.pipeline import compress
    from lowrank_kit.quant.report import held_tensor_bytes
    from lowrank_kit.recipe import recipe_from_flags

    model = build_tiny_model("llama", seed=0)
    recipe = recipe_from_flags(model="llama", method="svd", ratio=0.6, quant="w8a8")
    compress(model, recipe)
    model.eval()
    inputs = tiny_inputs(model, seed=4)
    with torch.no_grad():
        cpu_logits = model(**inputs).logits
        cpu_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    gpu = model.to("cuda")
    before = held_tensor_bytes(gpu)
    inputs = {k: v.to("cuda") for k, v in inputs.items()}
    with torch.no_grad():
        gpu_logits = gpu(**inputs).logits
        gpu_tokens = gpu.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert held_tensor_bytes(gpu) == before
    assert torch.equal(gpu_tokens.cpu(), cpu_tokens)
    # fp32 on both sides; the GPU's int path rounds differently only in accumulation order.
    assert rel(gpu_logits.cpu(), cpu_logits) < 1e-4
