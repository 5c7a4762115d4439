"""Rank allocation shared by the decomposers.

ρ1 is the fraction of parameters kept (METHODS.md §0): a dense ``m×n`` matrix at rank r keeps
``r(m+n)/(mn)``; one head (``d×n``) at rank r keeps ``r(n+d)/(dn)``. ``granularity`` g rounds ranks to
multiples of g (8 or 16 suit the decode kernel) without exceeding the matrix's own rank.

Strategies (recipe field ``rank_allocation``): ``uniform`` (:func:`dense_rank`, :func:`head_rank`: the
same ρ1 for every matrix or head), ``importance`` (:func:`importance_allocation`: global top-k of
per-singular-value scores, QSVD/WSVD) and ``sensitivity`` (:func:`sensitivity_allocation`: ASVD's
search for the loss threshold that meets the budget, then :func:`top_up`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lowrank_kit.errors import RecipeError


def round_rank(r: float, full: int, granularity: int = 1) -> int:
    """Nearest multiple of ``granularity`` to ``r``, at least one step (or 1) and at most ``full``."""
    g = max(int(granularity), 1)
    step = min(g, full)
    rounded = round(r / step) * step
    return max(step, min(rounded, full))


def dense_rank(m: int, n: int, ratio: float, granularity: int = 1) -> int:
    """Rank of an ``m×n`` matrix whose factors keep ``ratio`` of its parameters."""
    return round_rank(ratio * m * n / (m + n), min(m, n), granularity)


def head_rank(d: int, n: int, ratio: float, granularity: int = 1) -> int:
    """Rank of one ``d×n`` head slice whose factors keep ``ratio`` of its parameters."""
    return round_rank(ratio * d * n / (n + d), min(d, n), granularity)


def balanced_ranks(count: int, per_matrix: float, full: int, granularity: int = 1) -> list[int]:
    """Ranks for ``count`` equal matrices that together keep ``count·per_matrix`` rank units.

    ``uniform`` allocation without the systematic rounding of :func:`dense_rank`: every matrix gets the
    same multiple of g below the target or one step more, the extra steps spread evenly over the list,
    so the total is within half a step of the budget (ρ1 then lands within half a step of one matrix,
    not of every matrix at once).
    """
    g = max(int(granularity), 1)
    step = min(g, full)
    base = max(step, min(full, int(per_matrix // step) * step))
    extra = max(0, round((count * per_matrix - count * base) / step))
    ranks = []
    for i in range(count):
        bump = (i + 1) * extra // count - i * extra // count
        ranks.append(min(full, base + bump * step))
    return ranks


def check_fixed_rank(rank: int, full: int, what: str) -> int:
    """An explicitly requested rank must fit the matrix it factors."""
    if rank < 1 or rank > full:
        raise RecipeError(f"rank {rank} is impossible for {what}: it must be between 1 and {full}")
    return rank


ALLOCATIONS = ("uniform", "importance", "sensitivity")


def _selection_order(scores: torch.Tensor) -> torch.Tensor:
    """Index 0 (the largest singular value: the floor) first, then the rest by descending score."""
    rest = torch.argsort(scores[1:], descending=True, stable=True) + 1
    return torch.cat([torch.zeros(1, dtype=torch.long, device=scores.device), rest])


def importance_allocation(
    scores: Sequence[torch.Tensor], budget: float, granularity: int = 1, what: str = "the matrices"
) -> list[torch.Tensor]:
    """Global top-k over the components of several groups (heads, or layers) that cost the same each.

    ``scores[j][i]`` is the importance of component i of group j (i = 0 the largest singular value).
    ``budget`` is how many components all groups keep together (a real number: ρ1 times the parameter
    count over the cost of one component). Each group keeps its top singular component; the rest of
    the budget goes to the highest scores anywhere. With ``granularity`` g, components are taken in
    chunks of g per group (a group's next g by score, ranked by their mean score), so every group's
    rank is a multiple of g (or its full rank) and the total is within half a chunk of the budget.

    Returns, per group, the kept component indices in ascending order (descending σ).
    """
    g = max(int(granularity), 1)
    orders = [_selection_order(s.detach().float().cpu()) for s in scores]
    scores_cpu = [s.detach().double().cpu() for s in scores]
    kept = [min(g, len(o)) for o in orders]
    total = sum(kept)
    if total - budget > g / 2:
        raise RecipeError(
            f"the requested ratio leaves {budget:.1f} rank units for {what}, fewer than the "
            f"{total} needed to keep {'rank 1' if g == 1 else f'one granularity step ({g})'} in each of "
            f"the {len(orders)} groups; raise the ratio or lower the granularity"
        )
    chunks = []
    for j, (order, s) in enumerate(zip(orders, scores_cpu)):
        value = float("inf")
        for start in range(kept[j], len(order), g):
            idx = order[start : start + g]
            # Scores descend along a group's order, so chunk means do too; the running minimum only
            # guards against rounding, so that taking chunks by value keeps each group's choice a prefix.
            value = min(value, float(s[idx].mean()))
            chunks.append((-value, j, start, len(idx)))
    chunks.sort()  # ties: lower group, then earlier position first
    for _neg, j, _start, size in chunks:
        if abs(total + size - budget) >= abs(total - budget):
            break
        kept[j] += size
        total += size
    return [torch.sort(order[:k]).values for order, k in zip(orders, kept)]


def sensitivity_allocation(
    losses: Sequence[Sequence[float]], params: Sequence[Sequence[int]], budget: float
) -> list[int]:
    """ASVD's rank search: the loss threshold that meets the parameter budget.

    ``losses[j][c]`` is the calibration loss with only matrix j truncated to candidate c, whose factors
    have ``params[j][c]`` parameters (candidates in increasing size). For a threshold τ every matrix
    takes its smallest candidate with loss ≤ τ (its largest when none is); the parameter count only
    falls as τ grows, so a binary search over the observed losses finds the smallest τ whose choice
    fits ``budget``. Returns the chosen candidate index per matrix.
    """
    thresholds = sorted({float(v) for row in losses for v in row})

    def choose(tau: float) -> list[int]:
        out = []
        for row in losses:
            ok = [c for c, v in enumerate(row) if v <= tau]
            out.append(ok[0] if ok else len(row) - 1)
        return out

    def cost(choice: list[int]) -> int:
        return sum(params[j][c] for j, c in enumerate(choice))

    if cost(choose(thresholds[-1])) > budget:
        smallest = sum(p[0] for p in params)
        raise RecipeError(
            f"the requested ratio allows {budget:.0f} factor parameters, fewer than the {smallest} of the "
            "smallest candidate ratio for every matrix; raise the ratio or add smaller sensitivity candidates"
        )
    lo, hi = 0, len(thresholds) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(choose(thresholds[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return choose(thresholds[lo])


def top_up(
    ranks: list[int],
    unit_costs: Sequence[int],
    full: Sequence[int],
    budget: float,
    order: Sequence[int],
    granularity: int = 1,
) -> list[int]:
    """Spend what a coarse allocation left of ``budget`` by raising ranks in steps of ``granularity``.

    Matrices are visited round-robin in ``order`` (most deserving first); a step is taken while it
    brings the total closer to ``budget`` without exceeding it and the matrix is below its full rank.
    """
    g = max(int(granularity), 1)
    ranks = list(ranks)
    used = sum(r * c for r, c in zip(ranks, unit_costs))
    progress = True
    while progress:
        progress = False
        for j in order:
            step = min(g, full[j] - ranks[j])
            if step > 0 and used + step * unit_costs[j] <= budget:
                ranks[j] += step
                used += step * unit_costs[j]
                progress = True
    return ranks
