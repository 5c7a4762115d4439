"""Hadamard matrices of the orders real models need, by known constructions.

A Hadamard matrix of order n has entries ±1 and satisfies ``H Hᵀ = n I``; it exists only for n = 1, 2
or a multiple of 4. Constructions used here:

- Sylvester: ``H_2k = [[H_k, H_k], [H_k, −H_k]]`` (powers of two);
- Paley I: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``, from the quadratic character of GF(q);
- Paley II: order ``2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)``;
- Kronecker products: ``H_a ⊗ H_b`` has order ``a·b``.

Model sizes are a power of two times a small factor (11008 = 32·344 with 344 = 7³ + 1 by Paley I,
13824 = 128·108, 18944 = 128·148, 3584 = 128·28, 8960 = 64·140, ...). :func:`hadamard_plan` finds a
construction as a list of Kronecker factors, powers of two split into blocks of at most
:data:`MAX_BLOCK` so that applying the matrix online costs ``n · Σ block sizes`` multiply-adds instead
of ``n²``. Where no construction is known (order 172, or any order that is not 1, 2 or a multiple of
4, such as 9 or 15 heads), :func:`orthogonal_factors` falls back to a seeded random orthogonal matrix
and says so in the log; callers report it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

# Largest Sylvester block applied as one dense matmul online; bigger powers of two become several blocks.
MAX_BLOCK = 128


# -- finite fields ---------------------------------------------------------------------------------
def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k`` for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, int(q**0.5) + 1) if q % d == 0), q)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


def _poly_mod(a: list[int], mod: list[int], p: int) -> list[int]:
    """``a mod mod`` over GF(p); coefficient lists are lowest degree first, ``mod`` monic."""
    a = list(a)
    k = len(mod) - 1
    for i in range(len(a) - 1, k - 1, -1):
        c = a[i] % p
        if c:
            for j in range(k + 1):
                a[i - k + j] = (a[i - k + j] - c * mod[j]) % p
    return [x % p for x in a[:k]] + [0] * max(0, k - len(a))


def _poly_mul(a: list[int], b: list[int], p: int) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b):
                out[i + j] = (out[i + j] + x * y) % p
    return out


def _irreducible(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree k over GF(p) (the first one in lexicographic order)."""
    if k == 1:
        return [0, 1]
    for code in range(p**k):
        low = [(code // p**i) % p for i in range(k)]
        cand = [*low, 1]
        if low[0] == 0:
            continue
        # Irreducible iff no monic factor of degree 1..k//2 divides it.
        reducible = False
        for deg in range(1, k // 2 + 1):
            for dcode in range(p**deg):
                div = [(dcode // p**i) % p for i in range(deg)] + [1]
                if not any(_poly_mod(cand, div, p)):
                    reducible = True
                    break
            if reducible:
                break
        if not reducible:
            return cand
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """For GF(q), elements numbered 0..q−1 (base-p digits = polynomial coefficients): the table
    ``chi[x]`` (0, +1 for nonzero squares, −1 otherwise) and ``sub[x, y]`` = the number of ``x − y``."""
    pk = _prime_power(q)
    if pk is None:
        raise ValueError(f"{q} is not a prime power")
    p, k = pk
    digits = np.array([[(x // p**i) % p for i in range(k)] for x in range(q)], dtype=np.int64)
    weights = p ** np.arange(k, dtype=np.int64)
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    sub = (diff * weights).sum(-1)
    mod = _irreducible(p, k)
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    for x in range(1, q):
        sq = _poly_mod(_poly_mul(list(digits[x]), list(digits[x]), p), mod, p)
        chi[int(np.dot(sq, weights))] = 1
    return chi, sub


def _jacobsthal(q: int) -> np.ndarray:
    chi, sub = quadratic_character(q)
    return chi[sub]  # Q[i, j] = χ(a_i − a_j)


def paley1(q: int) -> np.ndarray:
    """Order q + 1, q ≡ 3 (mod 4) a prime power: ``H = I + [[0, 1ᵀ], [−1, Q]]``."""
    Q = _jacobsthal(q)
    n = q + 1
    S = np.zeros((n, n), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + np.eye(n, dtype=np.int64)


def paley2(q: int) -> np.ndarray:
    """Order 2(q + 1), q ≡ 1 (mod 4) a prime power, from the symmetric conference matrix
    ``C = [[0, 1ᵀ], [1, Q]]``: each 0 becomes ``[[1, −1], [−1, −1]]`` and each ±1 becomes ``±[[1, 1], [1, −1]]``."""
    Q = _jacobsthal(q)
    m = q + 1
    C = np.zeros((m, m), dtype=np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    one = np.array([[1, 1], [1, -1]], dtype=np.int64)
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    return np.kron(C, one) + np.kron(np.eye(m, dtype=np.int64), zero)


def sylvester(n: int) -> np.ndarray:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    H = np.ones((1, 1), dtype=np.int64)
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


# -- which construction for which order ---------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One Kronecker factor: ``kind`` is sylvester, paley1 or paley2; ``order`` its size; ``q`` Paley's field."""

    kind: str
    order: int
    q: int = 0

    def matrix(self) -> np.ndarray:
        if self.kind == "sylvester":
            return sylvester(self.order)
        if self.kind == "paley1":
            return paley1(self.q)
        return paley2(self.q)

    def describe(self) -> str:
        return f"{self.kind}({self.order})" if self.kind == "sylvester" else f"{self.kind}(q={self.q})"


def _paley_block(n: int) -> Block | None:
    pk = _prime_power(n - 1)
    if pk is not None and (n - 1) % 4 == 3:
        return Block("paley1", n, n - 1)
    if n % 2 == 0:
        q = n // 2 - 1
        if _prime_power(q) is not None and q % 4 == 1:
            return Block("paley2", n, q)
    return None


@functools.cache
def _odd_part_plan(m: int) -> tuple[Block, ...] | None:
    """Blocks whose Kronecker product has order m (m a multiple of 4 with no simpler route), or None."""
    direct = _paley_block(m)
    if direct is not None:
        return (direct,)
    for a in range(4, int(m**0.5) + 1, 4):
        if m % a == 0 and (m // a) % 4 == 0:
            left, right = _odd_part_plan(a), _odd_part_plan(m // a)
            if left is not None and right is not None:
                return left + right
    return None


def _split_power_of_two(n: int) -> tuple[Block, ...]:
    blocks = []
    while n > 1:
        size = min(n, MAX_BLOCK)
        blocks.append(Block("sylvester", size))
        n //= size
    return tuple(blocks)


@functools.cache
def hadamard_plan(n: int) -> tuple[Block, ...] | None:
    """Kronecker factors of a Hadamard matrix of order n (largest power-of-two part first), or None."""
    if n < 1:
        raise ValueError(f"a Hadamard matrix needs a positive order, got {n}")
    if n == 1:
        return ()
    twos = (n & -n).bit_length() - 1
    # Prefer the largest power of two (cheapest to apply), leaving the smallest Paley part that works.
    for j in range(twos, -1, -1):
        m = n >> j
        if m == 1:
            return _split_power_of_two(n)
        if m == 2:
            continue
        if m % 4 == 0 or _paley_block(m) is not None:
            rest = _odd_part_plan(m)
            if rest is not None:
                return _split_power_of_two(1 << j) + rest
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (entries ±1, fp64); raises ValueError when none is constructible."""
    plan = hadamard_plan(n)
    if plan is None:
        raise ValueError(f"no Hadamard construction (Sylvester, Paley I/II, Kronecker) of order {n}")
    H = np.ones((1, 1), dtype=np.int64)
    for block in plan:
        H = np.kron(H, block.matrix())
    return torch.from_numpy(H.astype(np.float64))


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal matrix (QR of a Gaussian, signs fixed so it is Haar-distributed), fp64."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))[None, :]


@dataclass(frozen=True)
class Factor:
    """One Kronecker factor of an orthogonal transform: ±1 entries (``hadamard``) to be scaled by
    ``1/√order``, or an orthonormal matrix (``orthogonal``, the random fallback)."""

    kind: str  # "hadamard" or "orthogonal"
    matrix: torch.Tensor  # [order, order] fp64
    construction: str

    @property
    def order(self) -> int:
        return self.matrix.shape[0]

    def normalized(self) -> torch.Tensor:
        return self.matrix / self.order**0.5 if self.kind == "hadamard" else self.matrix


def orthogonal_factors(n: int, seed: int, *, what: str) -> list[Factor]:
    """Kronecker factors of an n×n orthogonal transform: a Hadamard matrix split into blocks when one is
    constructible, else one seeded random orthogonal matrix (logged, naming ``what`` needed it)."""
    plan = hadamard_plan(n)
    if plan is None:
        log.warning(
            "no Hadamard matrix of order %d (%s) is constructible by Sylvester, Paley or Kronecker "
            "products; using a seeded random orthogonal matrix (seed %d) instead",
            n,
            what,
            seed,
        )
        return [Factor("orthogonal", random_orthogonal(n, seed), "random orthogonal")]
    if not plan:
        return [Factor("hadamard", torch.ones(1, 1, dtype=torch.float64), "identity")]
    return [Factor("hadamard", torch.from_numpy(b.matrix().astype(np.float64)), b.describe()) for b in plan]


def dense(factors: list[Factor]) -> torch.Tensor:
    """The orthonormal matrix ``F_1 ⊗ F_2 ⊗ ...`` (fp64) the factors describe."""
    out = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        out = torch.kron(out, f.normalized())
    return out


def kron_apply(x: torch.Tensor, orders: list[int], mats: list[torch.Tensor | None]) -> torch.Tensor:
    """``x · (M_1 ⊗ M_2 ⊗ ...)`` along the last dim without forming the product (``mats[i]`` None: an
    identity factor of ``orders[i]``).

    Column ``i`` of ``x`` is read as the multi-index ``(i_1, i_2, ...)`` with ``i_1`` the slowest, the
    order ``torch.kron`` uses; each factor then contracts its own axis.
    """
    lead = x.shape[:-1]
    # A contiguous copy first: reshaping a strided view (the columns of a weight) would copy per factor.
    y = x.contiguous().reshape(*lead, *orders)
    k = len(orders)
    for i, M in enumerate(mats):
        if M is None:
            continue
        axis = y.dim() - k + i
        y = torch.movedim(torch.movedim(y, axis, -1) @ M.to(y.device, y.dtype), -1, axis)
    return y.reshape(*lead, x.shape[-1])


def factor_matrices(factors: list[Factor]) -> list[torch.Tensor]:
    return [f.normalized() for f in factors]


def describe(factors: list[Factor]) -> str:
    return " ⊗ ".join(f.construction for f in factors)
