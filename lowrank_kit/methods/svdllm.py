"""``svdllm``: truncation-aware whitening (SVD-LLM).

Each target matrix is factored as the truncated SVD of ``W S``, where ``S Sᵀ = G`` whitens the layer
input (its Gram matrix over the calibration tokens), and ``B ← B S⁻¹``: the truncation then minimizes
the output error ``‖(W − AB) X‖`` on the calibration data rather than the weight error. Q, K and V read
the same input, so one whitening factor per layer serves all three. Same ρ1 for every matrix of a
target (ranks differ between layers by at most one granularity step, so that the total meets the budget).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lowrank_kit.methods.allocation import balanced_ranks
from lowrank_kit.methods.base import DecomposeJob, Decomposer, LayerPlan, MethodConfig, Plan
from lowrank_kit.methods.common import check_allocation, plan_rho1, ratio_of, requested_rank
from lowrank_kit.methods.linalg import spectrum, whitening
from lowrank_kit.methods.stats import StageRecorder, collect_input_stats, require_calibration


class SVDLLMConfig(MethodConfig):
    beta: float = Field(0.5, ge=0.0, le=1.0, description="Σ split: A = U Σ^(1-β), B = Σ^β Vᵀ S⁻¹")
    whitening: Literal["eigen", "cholesky"] = Field(
        "eigen",
        description="eigen: G = QΛQᵀ, S = QΛ^(1/2) (SVD-LLM V2, no positive definiteness needed); "
        "cholesky: S = chol(G), with jitter when G is not positive definite",
    )
    eps: float = Field(
        1e-6, gt=0.0, lt=1.0, description="eigenvalue floor (or Cholesky jitter) relative to the largest"
    )


class SVDLLMDecomposer(Decomposer):
    name = "svdllm"
    config_class = SVDLLMConfig
    summary = "whitened SVD of each target matrix (SVD-LLM)"
    needs_calibration = True
    allocations = ("uniform",)
    layout = "dense"

    def decompose(self, job: DecomposeJob) -> Plan:
        cfg = self.config
        check_allocation(job, self.name, self.allocations)
        recorder = StageRecorder(job.reporter, job.device)
        samples = require_calibration(job, self.name)
        stats = collect_input_stats(job, recorder, abs_mean=False, gram=True, samples=samples)
        n = job.info.hidden_size
        ranks: dict[str, list[int]] = {}
        for target in job.targets:
            m = job.info.out_features(target)
            rank = requested_rank(job, target, min(m, n), f"{target} ({m}×{n})")
            ranks[target] = (
                [rank] * len(job.layers)
                if rank is not None
                else balanced_ranks(
                    len(job.layers), ratio_of(job, target) * m * n / (m + n), min(m, n), job.granularity
                )
            )
        layers, whitening_info = [], {}
        with recorder.stage("svdllm: whitened SVD", total=len(job.layers)) as st:
            for i, layer in enumerate(job.layers):
                transform = whitening(
                    stats.gram.pop(layer), cfg.whitening, cfg.eps, where=f" of layer {layer}"
                )
                whitening_info[str(layer)] = transform.info()
                lp = LayerPlan(layer)
                for target in job.targets:
                    W = job.weight(layer, target)
                    lp.factors[target] = spectrum(W[None], transform).factors(0, ranks[target][i], cfg.beta)
                layers.append(lp)
                st.advance()
        plan = Plan(layers)
        plan.report.update(
            {
                "planned_rho1": plan_rho1(job, plan),
                "calibration_tokens": stats.tokens,
                "whitening": whitening_info,
                **recorder.report(),
            }
        )
        return plan
