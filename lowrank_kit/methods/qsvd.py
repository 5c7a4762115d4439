"""``qsvd``: one joint SVD of the stacked Q, K and V per layer, with a shared latent (QSVD, without Q).

Per layer, ``[W_q; W_k; W_v]·diag(s^α)`` (ASVD scaling of the shared input, α = 0.5) is factored by one
SVD: a shared down-projection ``B = Σ^β Vᵀ diag(s^{-α})`` and one up-projection per target (its rows of
``U Σ^{1−β}``). The cache holds the shared latent. Rank allocation ``importance`` ranks the singular
values of all layers together by ``I_i = σ_i · sqrt(mean_n (u_iᵀ G_n S^{-ᵀ} v_i)²)`` (``G_n`` the stacked
gradients of one sample) and keeps the global top-k (each layer at least its top component);
``uniform`` gives every layer the same rank (up to one granularity step, so that the total meets the
budget).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from lowrank_kit.errors import RecipeError
from lowrank_kit.methods.allocation import balanced_ranks, importance_allocation
from lowrank_kit.methods.base import DecomposeJob, Decomposer, LayerPlan, MethodConfig, Plan
from lowrank_kit.methods.common import check_allocation, plan_rho1, ratio_of
from lowrank_kit.methods.linalg import Spectrum, activation_scaling, spectrum
from lowrank_kit.methods.stats import (
    ImportanceBasis,
    StageRecorder,
    collect_gradient_stats,
    collect_input_stats,
    require_calibration,
)
from lowrank_kit.modules import JointFactors

JOINT = "qkv"


class QSVDConfig(MethodConfig):
    alpha: float = Field(0.5, ge=0.0, le=2.0, description="ASVD scaling exponent of the joint SVD")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="Σ split: A_t = U_t Σ^(1-β), B = Σ^β Vᵀ diag(s^-α)")
    eps: float = Field(1e-6, gt=0.0, lt=1.0, description="floor of s relative to its largest channel")


class QSVDDecomposer(Decomposer):
    name = "qsvd"
    config_class = QSVDConfig
    summary = "joint SVD of stacked Q/K/V with one shared latent per layer, importance ranks (QSVD)"
    needs_calibration = True
    allocations = ("importance", "uniform")
    layout = "joint"

    def decompose(self, job: DecomposeJob) -> Plan:
        cfg = self.config
        allocation = check_allocation(job, self.name, self.allocations)
        info = job.info
        n = info.hidden_size
        rows = {t: info.out_features(t) for t in job.targets}
        m = sum(rows.values())
        full = min(m, n)
        recorder = StageRecorder(job.reporter, job.device)
        samples = require_calibration(job, self.name)
        stats = collect_input_stats(job, recorder, abs_mean=True, gram=False, samples=samples)

        spectra: dict[int, Spectrum] = {}
        with recorder.stage("qsvd: joint scaled SVD", total=len(job.layers)) as st:
            for layer in job.layers:
                transform = activation_scaling(stats.abs_mean[layer], cfg.alpha, cfg.eps)
                W = torch.cat([job.weight(layer, t) for t in job.targets], dim=0)
                spectra[layer] = spectrum(W[None], transform)
                st.advance()

        if job.ranks:
            ranks = set(job.ranks.values())
            if len(ranks) != 1:
                raise RecipeError(
                    f"qsvd shares one latent across {', '.join(job.targets)}; got ranks {job.ranks}"
                )
            rank = ranks.pop()
            if not 1 <= rank <= full:
                raise RecipeError(
                    f"rank {rank} is impossible for the stacked {'/'.join(job.targets)} ({m}×{n}): "
                    f"it must be between 1 and {full}"
                )
        # Parameters the ratios keep, spread over one shared latent: each component costs n + Σm.
        kept_params = sum(ratio_of(job, t) * rows[t] * n for t in job.targets) if not job.ranks else 0.0
        per_layer = kept_params / (n + m)

        report: dict[str, Any] = {}
        if job.ranks:
            keep = {layer: torch.arange(rank) for layer in job.layers}
        elif allocation == "importance":
            bases = {
                (layer, JOINT): ImportanceBasis(spectra[layer], tuple(job.targets)) for layer in job.layers
            }
            grads = collect_gradient_stats(job, recorder, fisher=False, bases=bases, samples=samples)
            report["calibration_loss"] = grads.mean_loss
            scores = [grads.importance[(layer, JOINT)][0] for layer in job.layers]
            chosen = importance_allocation(
                scores, per_layer * len(job.layers), job.granularity, what="the layers' joint latents"
            )
            keep = dict(zip(job.layers, chosen))
        else:
            layer_ranks = balanced_ranks(len(job.layers), per_layer, full, job.granularity)
            keep = {layer: torch.arange(r) for layer, r in zip(job.layers, layer_ranks)}

        layers = []
        for layer in job.layers:
            f = spectra[layer].factors(0, keep[layer], cfg.beta)
            A, offset = {}, 0
            for t in job.targets:
                A[t] = f.A[offset : offset + rows[t]].clone()
                offset += rows[t]
            layers.append(LayerPlan(layer, joint=JointFactors(A, f.B)))
        plan = Plan(layers)
        plan.report.update(
            {
                "planned_rho1": plan_rho1(job, plan),
                "calibration_tokens": stats.tokens,
                **report,
                **recorder.report(),
            }
        )
        return plan
