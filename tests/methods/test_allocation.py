"""Rank allocation: importance top-k with floors and granularity, ASVD's threshold search, top-up."""

import itertools

import pytest
import torch

from lowrank_kit.errors import RecipeError
from lowrank_kit.methods.allocation import (
    balanced_ranks,
    dense_rank,
    head_rank,
    importance_allocation,
    sensitivity_allocation,
    top_up,
)


def _scores(groups: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(k, generator=gen) for _ in range(groups)]


def test_importance_is_a_global_top_k_above_the_floor():
    scores = _scores(5, 8)
    scores[2][0] = -1.0  # the top singular component is kept even when it scores lowest
    chosen = importance_allocation(scores, budget=17)
    assert sum(len(c) for c in chosen) == 17
    assert all(int(c[0]) == 0 for c in chosen)
    # Brute force: after the 5 floors, the 12 best remaining scores anywhere.
    rest = sorted(((float(s[i]), j, i) for j, s in enumerate(scores) for i in range(1, 8)), reverse=True)
    expected = {(j, 0) for j in range(5)} | {(j, i) for _, j, i in rest[:12]}
    got = {(j, int(i)) for j, c in enumerate(chosen) for i in c}
    assert got == expected
    assert all(torch.equal(c, torch.sort(c).values) for c in chosen)  # stored in descending-σ order


def test_importance_budget_is_met_to_the_nearest_component():
    scores = _scores(6, 10, seed=3)
    for budget in (6.0, 6.4, 13.5, 31.2, 59.9, 60.0):
        total = sum(len(c) for c in importance_allocation(scores, budget))
        assert abs(total - budget) <= 0.5


@pytest.mark.parametrize("g", [2, 4])
def test_importance_granularity_keeps_multiples_and_the_budget(g):
    scores = _scores(7, 10, seed=4)  # 10 is not a multiple of 4: a head's last chunk is short
    for budget in (7 * g + 0.3, 30.0, 41.7, 55.0):
        chosen = importance_allocation(scores, budget, granularity=g)
        ranks = [len(c) for c in chosen]
        assert all(r % g == 0 or r == 10 for r in ranks), ranks
        assert all(r >= g for r in ranks)
        assert abs(sum(ranks) - budget) <= g / 2 + 1e-9 or sum(ranks) == 70


def test_importance_chunks_take_whole_groups_of_the_best_scores():
    scores = [torch.tensor([1.0, 0.9, 0.8, 0.7]), torch.tensor([1.0, 0.1, 0.1, 0.1])]
    chosen = importance_allocation(scores, budget=6, granularity=2)
    assert [len(c) for c in chosen] == [4, 2]


def test_importance_refuses_a_budget_below_the_floor():
    with pytest.raises(
        RecipeError, match=r"leaves 3\.0 rank units for k_proj heads, fewer than the 6 needed"
    ):
        importance_allocation(_scores(6, 8), budget=3.0, what="k_proj heads")
    with pytest.raises(RecipeError, match=r"one granularity step \(8\) in each of the 4 groups"):
        importance_allocation(_scores(4, 16), budget=20.0, granularity=8)


def test_sensitivity_search_picks_the_smallest_fitting_threshold():
    losses = [[5.0, 3.0, 1.0], [2.0, 1.5, 1.0], [9.0, 4.0, 1.0]]
    params = [[1, 2, 3], [1, 2, 3], [1, 2, 3]]
    # Exhaustive reference: among all threshold-consistent choices that fit, the one with the lowest τ.
    for budget in (3, 4, 5, 6, 7, 9):
        choice = sensitivity_allocation(losses, params, budget)
        assert sum(params[j][c] for j, c in enumerate(choice)) <= budget
        best = None
        for tau in sorted({v for row in losses for v in row}):
            pick = [next((c for c, v in enumerate(row) if v <= tau), 2) for row in losses]
            if sum(params[j][c] for j, c in enumerate(pick)) <= budget:
                best = pick
                break
        assert choice == best


def test_sensitivity_search_refuses_an_impossible_budget():
    with pytest.raises(RecipeError, match="allows 2 factor parameters, fewer than the 3"):
        sensitivity_allocation([[1.0, 0.5]] * 3, [[1, 2]] * 3, budget=2)


def test_top_up_spends_the_leftover_without_exceeding_it():
    ranks = top_up([2, 2, 2], unit_costs=[10, 10, 20], full=[4, 8, 8], budget=150, order=[2, 0, 1])
    assert sum(r * c for r, c in zip(ranks, [10, 10, 20])) <= 150
    assert ranks[0] <= 4
    # Nothing else fits: every matrix either is full or its next step would overshoot.
    used = sum(r * c for r, c in zip(ranks, [10, 10, 20]))
    assert all(ranks[j] == [4, 8, 8][j] or used + c > 150 for j, c in enumerate([10, 10, 20]))
    assert top_up([3], [5], [8], budget=39, order=[0], granularity=4) == [7]
    assert top_up([3], [5], [8], budget=40, order=[0], granularity=4) == [8]  # a short last step to full rank


def test_uniform_ranks_meet_the_ratio_to_half_a_step():
    for (m, n), ratio in itertools.product([(64, 64), (32, 64), (128, 48)], [0.3, 0.5, 0.77]):
        r = dense_rank(m, n, ratio)
        assert abs(r * (m + n) / (m * n) - ratio) <= 0.5 * (m + n) / (m * n) + 1e-12
    assert head_rank(16, 64, 0.5) == round(0.5 * 16 * 64 / 80)


def test_balanced_ranks_spread_the_remainder_and_meet_the_budget():
    assert balanced_ranks(4, 6.4, 16) == [6, 7, 6, 7]
    for count, per, full, g in [(5, 6.4, 16, 1), (7, 10.3, 16, 4), (3, 15.9, 16, 1), (32, 41.6, 128, 8)]:
        ranks = balanced_ranks(count, per, full, g)
        assert max(ranks) - min(ranks) <= g
        assert all(r % g == 0 or r == full for r in ranks)
        assert abs(sum(ranks) - count * per) <= g / 2 + 1e-9
    assert balanced_ranks(3, 0.2, 16, 4) == [4, 4, 4]  # never below one step
