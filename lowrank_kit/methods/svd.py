"""``svd``: truncated SVD of each target matrix (Eckart–Young), the sanity baseline."""

from __future__ import annotations

import torch
from pydantic import Field

from lowrank_kit.methods.allocation import check_fixed_rank, dense_rank
from lowrank_kit.methods.base import DecomposeJob, Decomposer, LayerPlan, MethodConfig, Plan
from lowrank_kit.modules import DenseFactors


class SVDConfig(MethodConfig):
    beta: float = Field(0.5, ge=0.0, le=1.0, description="Σ split: A = U Σ^(1-β), B = Σ^β Vᵀ")


def split_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, beta: float) -> DenseFactors:
    """Factors of the rank-``rank`` truncation with the singular values split by ``beta``."""
    s = S[:rank]
    return DenseFactors(A=U[:, :rank] * s.pow(1.0 - beta), B=s.pow(beta)[:, None] * Vh[:rank])


class SVDDecomposer(Decomposer):
    name = "svd"
    config_class = SVDConfig
    summary = "truncated SVD of each target matrix (baseline)"
    layout = "dense"

    def decompose(self, job: DecomposeJob) -> Plan:
        layers = []
        with job.reporter.stage("svd: factor layers", total=len(job.layers)) as stage:
            for layer in job.layers:
                lp = LayerPlan(layer)
                for target in job.targets:
                    W = job.weight(layer, target).double()
                    m, n = W.shape
                    if job.ranks and target in job.ranks:
                        rank = check_fixed_rank(job.ranks[target], min(m, n), f"{target} ({m}×{n})")
                    else:
                        rank = dense_rank(m, n, job.ratios[target], job.granularity)
                    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                    f = split_svd(U, S, Vh, rank, self.config.beta)
                    lp.factors[target] = DenseFactors(f.A.float(), f.B.float())
                layers.append(lp)
                stage.advance()
        return Plan(layers)
