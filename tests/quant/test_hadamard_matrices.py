"""Hadamard constructions: H Hᵀ = n I for every order built, plans for the sizes real models need."""

import logging

import numpy as np
import pytest
import torch

from lowrank_kit.quant import hadamard_matrices as hm

# Orders the supported models need (hidden, intermediate, heads, head_dim of LLaVA 7B/13B, LLaVA-NeXT,
# SmolVLM, Qwen2-VL 2B/7B, Qwen2.5-VL 3B/7B, Molmo2 4B/8B) and the tiny models.
MODEL_ORDERS = [
    16,
    28,
    32,
    40,
    64,
    128,
    256,
    576,
    960,
    1536,
    2048,
    2560,
    3584,
    4096,
    5120,
    8192,
    8960,
    9728,
    11008,
    12288,
    13824,
    14336,
    18944,
]
# Orders small enough to check the assembled matrix whole.
DENSE_LIMIT = 2048


def _check(H: np.ndarray | torch.Tensor) -> None:
    H = torch.as_tensor(H, dtype=torch.float64)
    n = H.shape[0]
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 44, 48, 60, 68, 76, 108, 140, 148, 344])
def test_small_orders_are_hadamard(n):
    _check(hm.hadamard_matrix(n))


@pytest.mark.parametrize("n", MODEL_ORDERS)
def test_model_orders_have_a_construction(n):
    plan = hm.hadamard_plan(n)
    assert plan is not None
    assert np.prod([b.order for b in plan]) == n
    # A Kronecker product of Hadamard matrices is one: every block is checked, and the whole matrix
    # where it is small enough to build.
    for block in plan:
        _check(block.matrix())
        assert block.order <= max(hm.MAX_BLOCK, 344)
    if n <= DENSE_LIMIT:
        _check(hm.hadamard_matrix(n))


def test_the_non_power_of_two_sizes_use_paley():
    assert [b.describe() for b in hm.hadamard_plan(11008)] == ["sylvester(32)", "paley1(q=343)"]
    assert [b.describe() for b in hm.hadamard_plan(13824)] == ["sylvester(128)", "paley1(q=107)"]
    assert [b.describe() for b in hm.hadamard_plan(18944)] == ["sylvester(128)", "paley2(q=73)"]
    assert [b.describe() for b in hm.hadamard_plan(3584)] == ["sylvester(128)", "paley1(q=27)"]


def test_prime_power_fields():
    # GF(27) and GF(343) need polynomial arithmetic: every nonzero element's character is ±1 and half
    # of them are squares.
    for q in (9, 25, 27, 49, 343):
        chi, sub = hm.quadratic_character(q)
        assert chi[0] == 0 and (chi[1:] == 1).sum() == (q - 1) // 2
        assert (sub.diagonal() == 0).all()


@pytest.mark.parametrize("n", [3, 6, 9, 15, 172])
def test_no_construction_falls_back_to_a_logged_random_orthogonal(n, caplog):
    assert hm.hadamard_plan(n) is None
    with pytest.raises(ValueError, match=f"no Hadamard construction .* of order {n}"):
        hm.hadamard_matrix(n)
    with caplog.at_level(logging.WARNING, logger="lowrank_kit.quant.hadamard_matrices"):
        factors = hm.orthogonal_factors(n, seed=3, what="the attention heads")
    assert "random orthogonal" in caplog.text and "the attention heads" in caplog.text
    Q = hm.dense(factors)
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, hm.dense(hm.orthogonal_factors(n, seed=3, what="x")))  # seeded


def test_kron_apply_matches_the_dense_product():
    factors = hm.orthogonal_factors(48, seed=0, what="test")  # sylvester(4) ⊗ paley1(11)
    x = torch.randn(5, 48, dtype=torch.float64)
    mats = hm.factor_matrices(factors)
    assert torch.allclose(
        hm.kron_apply(x, [f.order for f in factors], mats), x @ hm.dense(factors), atol=1e-12
    )
    # An identity factor (the head-dim part of the across-heads transform).
    H4 = mats[0]
    y = hm.kron_apply(x, [4, 12], [H4, None])
    assert torch.allclose(y, x @ torch.kron(H4, torch.eye(12, dtype=torch.float64)), atol=1e-12)


def test_order_must_be_positive():
    with pytest.raises(ValueError, match="positive order"):
        hm.hadamard_plan(0)
