"""Runtime low-rank modules (what a compressed model runs) and the factor types decomposers produce.

Conventions (METHODS.md §0): ``nn.Linear`` computes ``y = x Wᵀ`` with ``W ∈ R^{m×n}``. A low-rank
factorization is ``W ≈ A B`` with ``A ∈ R^{m×r}``, ``B ∈ R^{r×n}``; the latent is ``c = x Bᵀ``.

Offline work (decomposers) produces :class:`DenseFactors`, :class:`HeadFactors` or
:class:`JointFactors`; :func:`build_module` turns them into runtime modules. Runtime modules only run
factors; they never decompose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowrank_kit.kernels.latent_attention.layout import LatentLayout


@dataclass
class DenseFactors:
    """One matrix ``W ≈ A B`` (A: m×r, B: r×n)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.B.shape[0]

    @property
    def num_params(self) -> int:
        return self.A.numel() + self.B.numel()


@dataclass
class HeadFactors:
    """Per-head factors of one projection: head h is ``W_h ≈ A[h] B[h]`` (A[h]: d×r_h, B[h]: r_h×n)."""

    A: list[torch.Tensor]
    B: list[torch.Tensor]

    @property
    def ranks(self) -> list[int]:
        return [b.shape[0] for b in self.B]

    @property
    def num_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in zip(self.A, self.B))


@dataclass
class JointFactors:
    """Several projections sharing one latent: ``W_t ≈ A[t] B`` for each target t (QSVD's joint QKV)."""

    A: dict[str, torch.Tensor]
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.B.shape[0]

    @property
    def num_params(self) -> int:
        return self.B.numel() + sum(a.numel() for a in self.A.values())


Factors = DenseFactors | HeadFactors | JointFactors


def _linear(in_f: int, out_f: int, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: ``down`` holds B (r×n, no bias), ``up`` holds A (m×r) and the original bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, **factory) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, **factory)
        self.up = nn.Linear(rank, out_features, bias=bias, **factory)

    @classmethod
    def from_factors(
        cls, f: DenseFactors, bias: torch.Tensor | None, dtype: torch.dtype, device
    ) -> LowRankLinear:
        m, r = f.A.shape
        mod = cls(f.B.shape[1], m, r, bias=bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            mod.down.weight.copy_(f.B)
            mod.up.weight.copy_(f.A)
            if bias is not None:
                mod.up.bias.copy_(bias)
        return mod

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``A B`` (for inspection and reference paths; the forward never builds it)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class PerHeadLowRankLinear(nn.Module):
    """Every head of one projection in one module, with ragged per-head ranks.

    ``down.weight`` stacks the heads' B blocks (Σr_h × n): one matmul gives all latents, laid out head
    after head exactly as the latent cache stores them. ``up_weight`` (d × Σr_h) holds the heads' A
    blocks side by side, so head h's output is ``c[..., o_h:o_h+r_h] @ A_hᵀ``. No padding is stored.
    """

    def __init__(
        self, in_features: int, head_dim: int, ranks: list[int], bias: bool = False, **factory
    ) -> None:
        super().__init__()
        if not ranks or min(ranks) < 1:
            raise ValueError(f"every head needs rank >= 1, got ranks {ranks}")
        self.in_features, self.head_dim = in_features, head_dim
        self.ranks = [int(r) for r in ranks]
        self.num_heads = len(self.ranks)
        self.out_features = self.num_heads * head_dim
        total = sum(self.ranks)
        self.down = nn.Linear(in_features, total, bias=False, **factory)
        self.up_weight = nn.Parameter(torch.empty(head_dim, total, **factory))
        self.bias = nn.Parameter(torch.zeros(self.out_features, **factory)) if bias else None
        offsets = [0]
        for r in self.ranks:
            offsets.append(offsets[-1] + r)
        self.offsets = offsets
        # Derived tensors of the ragged up-projection (index tables, padded weights); not state.
        self._runtime_cache: dict = {}

    @classmethod
    def from_factors(
        cls, f: HeadFactors, bias: torch.Tensor | None, dtype: torch.dtype, device
    ) -> PerHeadLowRankLinear:
        d = f.A[0].shape[0]
        mod = cls(f.B[0].shape[1], d, f.ranks, bias=bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            mod.down.weight.copy_(torch.cat(f.B, dim=0))
            mod.up_weight.copy_(torch.cat(f.A, dim=1))
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    @property
    def uniform(self) -> bool:
        return len(set(self.ranks)) == 1

    def head_up(self, h: int) -> torch.Tensor:
        """A_h (d × r_h)."""
        return self.up_weight[:, self.offsets[h] : self.offsets[h + 1]]

    def head_down(self, h: int) -> torch.Tensor:
        """B_h (r_h × n)."""
        return self.down.weight[self.offsets[h] : self.offsets[h + 1]]

    def factors(self) -> HeadFactors:
        return HeadFactors(
            A=[self.head_up(h) for h in range(self.num_heads)],
            B=[self.head_down(h) for h in range(self.num_heads)],
        )

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.head_up(h) @ self.head_down(h) for h in range(self.num_heads)], dim=0)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)

    def up(self, c: torch.Tensor) -> torch.Tensor:
        """Latents (..., Σr_h) → outputs (..., H·d), bias included."""
        if self.uniform:
            r = self.ranks[0]
            cs = c.unflatten(-1, (self.num_heads, r))  # [..., H, r]
            ups = self.up_weight.view(self.head_dim, self.num_heads, r)  # [d, H, r]
            out = torch.einsum("...hr,dhr->...hd", cs, ups).flatten(-2)
        else:
            # Ragged ranks in one batched product over heads padded to the widest rank (the padding
            # multiplies zeros): a loop over heads costs two launches a head, ~2000 a decode step of a
            # 32-layer model, which the GPU then waits on.
            # Slots past a head's rank read column 0 of the latent; their weights are zero.
            index, valid = self._ragged_index(c.device)
            out = torch.einsum("...hr,hrd->...hd", c[..., index], self._padded_up(index, valid)).flatten(-2)
        return out + self.bias if self.bias is not None else out

    def _ragged_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """[H, r_max] column of each head's latent slot (0 where past its rank) and the valid mask: the
        latent cache's head columns of an unpadded per-head layout."""
        key = ("index", device)
        hit = self._runtime_cache.get(key)
        if hit is None:
            index, valid = LatentLayout.per_head(self.ranks, align=1).head_columns()
            hit = self._runtime_cache[key] = (index.to(device), valid.to(device))
        return hit

    def _padded_up(self, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The heads' A blocks as [H, r_max, d], zero past each rank; kept while the weight is unchanged
        and no gradient flows through it."""
        w = self.up_weight
        pad = lambda: (w[:, index] * valid.to(w.dtype)).permute(1, 2, 0)  # noqa: E731
        if torch.is_grad_enabled() and w.requires_grad:
            return pad()
        key = ("up", w.device, w.dtype, w.data_ptr(), w._version)
        hit = self._runtime_cache.get(key)
        if hit is None:
            self._runtime_cache = {k: v for k, v in self._runtime_cache.items() if k[0] != "up"}
            hit = self._runtime_cache[key] = pad().contiguous()
        return hit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, heads={self.num_heads}, head_dim={self.head_dim}, ranks={self.ranks}"


class SharedLatent(nn.Module):
    """The shared down-projection of a joint factorization (one latent for several projections)."""

    def __init__(self, in_features: int, rank: int, **factory) -> None:
        super().__init__()
        self.in_features, self.rank = in_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)


class JointLowRankProjection(nn.Module):
    """One projection of a joint factorization: ``y = up(shared(x))``.

    The :class:`SharedLatent` instance is the same object in the q, k and v projections of one layer,
    so its weight is stored once (safetensors ties it) and counted once in ρ1.
    """

    def __init__(self, shared: SharedLatent, out_features: int, bias: bool = False, **factory) -> None:
        super().__init__()
        self.shared = shared
        self.in_features, self.out_features, self.rank = shared.in_features, out_features, shared.rank
        self.up = nn.Linear(shared.rank, out_features, bias=bias, **factory)

    @property
    def weight(self) -> torch.Tensor:
        return self.up.weight @ self.shared.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.shared(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, shared_rank={self.rank}"


LOW_RANK_MODULES = (LowRankLinear, PerHeadLowRankLinear, JointLowRankProjection)


def build_joint_modules(
    f: JointFactors, biases: dict[str, torch.Tensor | None], dtype: torch.dtype, device
) -> dict[str, JointLowRankProjection]:
    r, n = f.B.shape
    shared = SharedLatent(n, r, dtype=dtype, device=device)
    with torch.no_grad():
        shared.down.weight.copy_(f.B)
    out = {}
    for target, A in f.A.items():
        bias = biases.get(target)
        mod = JointLowRankProjection(shared, A.shape[0], bias=bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            mod.up.weight.copy_(A)
            if bias is not None:
                mod.up.bias.copy_(bias)
        out[target] = mod
    return out
