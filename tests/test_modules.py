import pytest
import torch

from lowrank_kit.modules import (
    DenseFactors,
    HeadFactors,
    JointFactors,
    LowRankLinear,
    PerHeadLowRankLinear,
    build_joint_modules,
)

# fp32 products of small matrices: errors are ~1e-6 relative; 1e-5 leaves room for summation order.
RTOL = 1e-5


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_low_rank_linear_matches_dense_product():
    g = torch.Generator().manual_seed(0)
    A, B, bias = torch.randn(12, 5, generator=g), torch.randn(5, 9, generator=g), torch.randn(12, generator=g)
    mod = LowRankLinear.from_factors(DenseFactors(A, B), bias, torch.float32, "cpu")
    x = torch.randn(3, 4, 9, generator=g)
    assert _rel(mod(x), x @ (A @ B).T + bias) < RTOL
    assert _rel(mod.weight, A @ B) < RTOL
    assert mod.latent(x).shape == (3, 4, 5)


@pytest.mark.parametrize("ranks", [[3, 3, 3, 3], [1, 7, 2, 5]])
def test_per_head_matches_blockwise_product(ranks):
    g = torch.Generator().manual_seed(1)
    d, n = 6, 10
    A = [torch.randn(d, r, generator=g) for r in ranks]
    B = [torch.randn(r, n, generator=g) for r in ranks]
    bias = torch.randn(len(ranks) * d, generator=g)
    mod = PerHeadLowRankLinear.from_factors(HeadFactors(A, B), bias, torch.float32, "cpu")
    W = torch.cat([a @ b for a, b in zip(A, B)], dim=0)
    x = torch.randn(2, 5, n, generator=g)
    assert _rel(mod(x), x @ W.T + bias) < RTOL
    assert mod.down.weight.shape == (sum(ranks), n)
    assert mod.up_weight.shape == (d, sum(ranks))  # no padding to the largest rank
    back = mod.factors()
    assert all(torch.equal(a, b) for a, b in zip(back.A, A))


def test_per_head_rejects_rank_zero():
    with pytest.raises(ValueError, match="every head needs rank >= 1"):
        PerHeadLowRankLinear(8, 4, [2, 0])


def test_joint_projections_share_one_latent():
    g = torch.Generator().manual_seed(2)
    n, r = 10, 4
    f = JointFactors(
        A={"q_proj": torch.randn(8, r, generator=g), "k_proj": torch.randn(4, r, generator=g)},
        B=torch.randn(r, n, generator=g),
    )
    mods = build_joint_modules(f, {"q_proj": None, "k_proj": torch.ones(4)}, torch.float32, "cpu")
    assert mods["q_proj"].shared is mods["k_proj"].shared
    x = torch.randn(3, n, generator=g)
    assert _rel(mods["k_proj"](x), x @ (f.A["k_proj"] @ f.B).T + 1) < RTOL
    assert f.num_params == r * n + 8 * r + 4 * r


def test_dtype_and_device_are_preserved():
    f = DenseFactors(torch.randn(4, 2), torch.randn(2, 6))
    mod = LowRankLinear.from_factors(f, None, torch.bfloat16, "cpu")
    assert mod.up.weight.dtype == torch.bfloat16 and mod.down.weight.dtype == torch.bfloat16


def test_ragged_up_projection_follows_weight_edits_and_carries_gradients():
    """Ragged ranks run as one padded product whose padded weight is kept between calls: it must follow
    an in-place edit of the weight and must not cut the gradient when the weight is trained."""
    torch.manual_seed(1)
    ranks = [3, 9, 16, 1]
    A = [torch.randn(8, r) for r in ranks]
    B = [torch.randn(r, 12) for r in ranks]
    mod = PerHeadLowRankLinear.from_factors(HeadFactors(A, B), None, torch.float32, "cpu")
    x = torch.randn(2, 5, 12)

    def blockwise():
        return torch.cat([x @ mod.head_down(h).T @ mod.head_up(h).T for h in range(4)], dim=-1)

    with torch.no_grad():
        assert torch.allclose(mod(x), blockwise(), atol=1e-5)
        mod.up_weight[:, 3:12] *= -2.0  # head 1's A block, edited in place
        assert torch.allclose(mod(x), blockwise(), atol=1e-5)
    mod(x).pow(2).sum().backward()
    grad = mod.up_weight.grad
    assert grad is not None and bool((grad[:, 3:12] != 0).any())
