"""Rank allocation shared by the decomposers.

ρ1 is the fraction of parameters kept (METHODS.md §0): a dense ``m×n`` matrix at rank r keeps
``r(m+n)/(mn)``; one head (``d×n``) at rank r keeps ``r(n+d)/(dn)``. ``granularity`` g rounds ranks to
multiples of g (8 or 16 suit the decode kernel) without exceeding the matrix's own rank.
"""

from __future__ import annotations

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


def check_fixed_rank(rank: int, full: int, what: str) -> int:
    """An explicitly requested rank must fit the matrix it factors."""
    if rank < 1 or rank > full:
        raise RecipeError(f"rank {rank} is impossible for {what}: it must be between 1 and {full}")
    return rank
