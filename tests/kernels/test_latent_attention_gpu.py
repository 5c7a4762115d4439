"""The latent-attention kernel against its naive twin at real model sizes, on a CUDA GPU.

LLaVA-NeXT-7B attention (32 query = 32 KV heads) and Qwen2-VL-7B (28 query over 4 KV heads, M-RoPE,
K bias), head_dim 128, up to 32K cached tokens, uniform and ragged ranks, fp16/bf16/int8 latents, a
shared latent, QK-norm. Outputs and split partials start as NaN.
"""

import pytest
import torch

from lowrank_kit.kernels.latent_attention import naive
from lowrank_kit.kernels.latent_attention.launch import LaunchConfig, heads_launch_config, launch_config
from lowrank_kit.kernels.latent_attention.testing import make_problem, relative_error, run_poisoned

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU to run the compiled Triton kernel"
    ),
]

# Same roundings as the CPU tests: fp16 operands with fp32 accumulation (~5e-4 measured on small
# shapes); bf16 keeps 8 mantissa bits in K, scores and probabilities (~1.3e-2).
TOL = {torch.float16: 3e-3, torch.bfloat16: 4e-2}

RAGGED_32 = [17, 48, 64, 128, 8, 96, 40, 72] * 4
LLAVA = dict(num_heads=32, num_kv_heads=32, head_dim=128)
QWEN = dict(num_heads=28, num_kv_heads=4, head_dim=128, bias=True, mrope_section=(16, 24, 24))

CASES = {
    "llava_uniform64_8k": dict(**LLAVA, k_ranks=[64] * 32, v_ranks=[64] * 32, lengths=[8192, 8192]),
    "llava_ragged_int8": dict(
        **LLAVA,
        k_ranks=RAGGED_32,
        v_ranks=RAGGED_32[::-1],
        lengths=[4099, 63, 1],
        left_pad=[0, 17, 4000],
        int8=True,
    ),
    "llava_bf16_ragged": dict(
        **LLAVA, k_ranks=RAGGED_32, v_ranks=RAGGED_32, lengths=[3000, 1000], dtype=torch.bfloat16
    ),
    "qwen_ragged_leftpad": dict(
        **QWEN,
        k_ranks=[17, 48, 128, 64],
        v_ranks=[48, 17, 64, 128],
        lengths=[4095, 1, 2000],
        left_pad=[0, 4000, 100],
    ),
    "qwen_int8_uniform_32k": dict(**QWEN, k_ranks=[64] * 4, v_ranks=[64] * 4, lengths=[32768], int8=True),
    "shared_latent": dict(**LLAVA, k_ranks=[2048], v_ranks=[2048], lengths=[1000, 777], layout="shared"),
    # LLaVA shapes above run on the per-head kernel (MHA, per-head latents); these add its other paths.
    "llava_heads_mrope_bias_qknorm_int8": dict(
        **LLAVA,
        k_ranks=RAGGED_32,
        v_ranks=RAGGED_32[::-1],
        lengths=[2000, 17],
        left_pad=[0, 900],
        bias=True,
        mrope_section=(16, 24, 24),
        qk_norm="per_head",
        int8=True,
    ),
    "llava_uniform32_16k": dict(**LLAVA, k_ranks=[32] * 32, v_ranks=[32] * 32, lengths=[16384, 3]),
    "qk_norm_per_head": dict(
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        k_ranks=[64] * 8,
        v_ranks=[48] * 8,
        lengths=[5000, 63],
        qk_norm="per_head",
        bias=True,
    ),
}


def _llava_problem(seed, **spec):
    """Two LLaVA-NeXT rows (8192 tokens, and 1000 after 77 of left padding), fp16, on the GPU."""
    return make_problem(
        seed=seed,
        device="cuda",
        batch=2,
        **LLAVA,
        lengths=[8192, 1000],
        left_pad=[0, 77],
        dtype=torch.float16,
        **spec,
    )


def _error_vs_naive(p, config=None) -> float:
    """The kernel's relative error against the naive twin, outputs and split partials poisoned with NaN
    first (an unwritten output fails the finiteness check)."""
    out = run_poisoned(p, config)
    ref = naive.latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends)
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    return relative_error(out, ref)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_naive_at_model_sizes(name):
    spec = {"dtype": torch.float16, **CASES[name]}
    spec["batch"] = len(spec["lengths"])
    # Positions as in generation (slot minus left padding), then random up to 30000 (large angles).
    for seed, positions in ((0, "sequential"), (1, "random")):
        p = make_problem(seed=seed, positions=positions, device="cuda", **spec)
        err = _error_vs_naive(p)
        assert err < TOL[spec["dtype"]], f"{name} seed {seed}: relative error {err:.2e}"


@pytest.mark.parametrize("positions", ["sequential", "random"])
@pytest.mark.parametrize("heads_per_program", [1, 2, 4])
def test_heads_per_program_at_model_size(heads_per_program, positions):
    p = _llava_problem(3, k_ranks=[64] * 32, v_ranks=[64] * 32, positions=positions)
    base = heads_launch_config(2, p.max_len, p.w, p.q.device, heads_per_program)
    err = _error_vs_naive(p, base)
    assert err < TOL[torch.float16], f"heads_per_program {heads_per_program}: relative error {err:.2e}"


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize(
    "heads_per_program, block_n, stages, maxnreg", [(2, 64, 1, 168), (2, 32, 2, 168), (1, 64, 2, 128)]
)
def test_register_capped_launch_at_model_size(heads_per_program, block_n, stages, maxnreg, int8):
    """Launches whose register cap makes ptxas spill (maxnreg) give the same result as the naive twin."""
    p = _llava_problem(4, k_ranks=[64] * 32, v_ranks=[64] * 32, int8=int8)
    cfg = LaunchConfig(block_n, 4, stages, 0, 0, 0, heads_per_program, maxnreg=maxnreg)
    err = _error_vs_naive(p, cfg)
    assert err < TOL[torch.float16], f"{cfg}: relative error {err:.2e}"


@pytest.mark.parametrize("int8", [False, True])
def test_ragged_ranks_in_packed_order_at_model_size(int8):
    """The allocator's ragged ranks over 32 heads in the runtime's packed row order (programs of heads
    that are not adjacent by index), as the end-to-end benchmark's compressed model lays them out."""
    # Imported here: the benchmark pulls in transformers and pydantic, which the other tests here do not need.
    from lowrank_kit.bench.kernel import ragged_ranks

    p = _llava_problem(
        5,
        k_ranks=ragged_ranks(0.5, 32, 128, 1),
        v_ranks=ragged_ranks(0.5, 32, 128, 2),
        int8=int8,
        positions="sequential",
        head_order="packed",
    )
    assert p.w.k_layout.order != tuple(range(32))
    cfg = launch_config(2, 32, p.max_len, p.w, p.q.device)
    assert cfg.heads_per_program > 0
    err = _error_vs_naive(p)
    assert err < TOL[torch.float16], f"relative error {err:.2e}"
