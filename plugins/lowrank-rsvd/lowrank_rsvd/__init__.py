"""``rsvd``: truncated SVD computed by a randomized range finder (Halko, Martinsson and Tropp, 2011).

An example lowrank_kit plugin. A method is one config class (pydantic, ``extra="forbid"`` through
``MethodConfig``) plus one ``Decomposer`` subclass; the module-level ``register_decomposers`` hook
hands the class to lowrank_kit. Copy this package to start your own method.
"""

from __future__ import annotations

import torch
from pydantic import Field

from lowrank_kit import hookimpl
from lowrank_kit.methods.allocation import check_fixed_rank, dense_rank
from lowrank_kit.methods.base import DecomposeJob, Decomposer, LayerPlan, MethodConfig, Plan
from lowrank_kit.modules import DenseFactors

__all__ = ["RandomizedSVD", "RandomizedSVDConfig", "randomized_svd"]


class RandomizedSVDConfig(MethodConfig):
    oversample: int = Field(8, ge=0, description="extra random directions beyond the target rank")
    power_iters: int = Field(
        2, ge=0, description="subspace (power) iterations; sharpen a slowly decaying spectrum"
    )
    beta: float = Field(0.5, ge=0.0, le=1.0, description="Σ split: A = U Σ^(1-β), B = Σ^β Vᵀ")


def randomized_svd(
    W: torch.Tensor, rank: int, oversample: int, power_iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of ``W`` (m×n) from a sketch of ``rank + oversample`` random directions."""
    m, n = W.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, dtype=W.dtype, device="cpu").to(W.device)
    Q, _ = torch.linalg.qr(W @ omega)
    for _ in range(power_iters):
        # Re-orthonormalise after every product so the small singular directions are not lost to rounding.
        Z, _ = torch.linalg.qr(W.T @ Q)
        Q, _ = torch.linalg.qr(W @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


class RandomizedSVD(Decomposer):
    name = "rsvd"
    config_class = RandomizedSVDConfig
    summary = "randomized truncated SVD of each target matrix (example plugin)"
    layout = "dense"

    def decompose(self, job: DecomposeJob) -> Plan:
        cfg = self.config
        gen = torch.Generator().manual_seed(job.seed)
        layers = []
        with job.reporter.stage("rsvd: factor layers", total=len(job.layers)) as stage:
            for layer in job.layers:
                lp = LayerPlan(layer)
                for target in job.targets:
                    W = job.weight(layer, target).double()
                    m, n = W.shape
                    if job.ranks and target in job.ranks:
                        rank = check_fixed_rank(job.ranks[target], min(m, n), f"{target} ({m}×{n})")
                    else:
                        rank = dense_rank(m, n, job.ratios[target], job.granularity)
                    U, S, Vh = randomized_svd(W, rank, cfg.oversample, cfg.power_iters, gen)
                    A = U * S.pow(1.0 - cfg.beta)
                    B = S.pow(cfg.beta)[:, None] * Vh
                    lp.factors[target] = DenseFactors(A.float(), B.float())
                layers.append(lp)
                stage.advance()
        return Plan(layers, report={"rsvd": {"oversample": cfg.oversample, "power_iters": cfg.power_iters}})


@hookimpl
def register_decomposers(register):
    register(RandomizedSVD)
