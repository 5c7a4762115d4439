"""``asvd``: activation-aware SVD (ASVD).

Each target matrix is factored as the truncated SVD of ``W·diag(s^α)``, where ``s_j`` is the mean
absolute activation of input channel j on the calibration tokens, and ``B ← B·diag(s^{-α})``: channels
that carry large activations are preserved first.

Rank allocation ``uniform`` gives every matrix of a target the same ρ1 (ranks differ between layers by
at most one granularity step, so that the total meets the budget). ``sensitivity`` is ASVD's search (STRS):
each matrix alone is truncated to every candidate ratio and the calibration loss measured; the loss
threshold that meets the total parameter budget then picks each matrix's ratio, and what the coarse
grid leaves of the budget is spent on the most sensitive matrices in single granularity steps.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator

from lowrank_kit.calib_cache import cached
from lowrank_kit.methods.allocation import balanced_ranks, dense_rank, sensitivity_allocation, top_up
from lowrank_kit.methods.base import DecomposeJob, Decomposer, LayerPlan, MethodConfig, Plan
from lowrank_kit.methods.common import check_allocation, plan_rho1, ratio_of, requested_rank
from lowrank_kit.methods.linalg import Spectrum, activation_scaling, spectrum
from lowrank_kit.methods.stats import (
    StageRecorder,
    calibration_loss,
    collect_input_stats,
    require_calibration,
)


class ASVDConfig(MethodConfig):
    alpha: float = Field(0.5, ge=0.0, le=2.0, description="scaling exponent: SVD of W·diag(s^α)")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="Σ split: A = U Σ^(1-β), B = Σ^β Vᵀ diag(s^-α)")
    eps: float = Field(1e-6, gt=0.0, lt=1.0, description="floor of s relative to its largest channel")
    sensitivity_ratios: list[float] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 11)],
        min_length=2,
        description="candidate ρ1 per matrix for rank_allocation: sensitivity (ascending)",
    )
    sensitivity_samples: int = Field(
        16, ge=1, description="calibration samples used to measure each candidate's loss (sensitivity only)"
    )

    @field_validator("sensitivity_ratios")
    @classmethod
    def _ascending(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < r <= 1.0 for r in v) or sorted(set(v)) != v:
            raise ValueError(f"sensitivity_ratios must be distinct, ascending and in (0, 1], got {v}")
        return v


class ASVDDecomposer(Decomposer):
    name = "asvd"
    config_class = ASVDConfig
    summary = "activation-aware SVD of each target matrix (ASVD), optional sensitivity rank search"
    needs_calibration = True
    allocations = ("uniform", "sensitivity")
    layout = "dense"

    def decompose(self, job: DecomposeJob) -> Plan:
        cfg = self.config
        allocation = check_allocation(job, self.name, self.allocations)
        recorder = StageRecorder(job.reporter, job.device)
        samples = require_calibration(job, self.name)
        stats = collect_input_stats(job, recorder, abs_mean=True, gram=False, samples=samples)
        spectra: dict[tuple[int, str], Spectrum] = {}
        with recorder.stage("asvd: scaled SVD", total=len(job.layers)) as st:
            for layer in job.layers:
                transform = activation_scaling(stats.abs_mean[layer], cfg.alpha, cfg.eps)
                for target in job.targets:
                    spectra[(layer, target)] = spectrum(job.weight(layer, target)[None], transform)
                st.advance()

        keys = list(spectra)
        shapes = {key: (job.info.out_features(key[1]), job.info.hidden_size) for key in keys}
        ranks: dict[tuple[int, str], int] = {}
        report: dict[str, Any] = {}
        fixed = {t: requested_rank(job, t, min(shapes[(job.layers[0], t)]), t) for t in job.targets}
        if allocation == "sensitivity":
            ranks, report["sensitivity"] = self._sensitivity(job, spectra, shapes, samples, recorder)
        else:
            for target in job.targets:
                m, n = shapes[(job.layers[0], target)]
                r = fixed[target]
                per_layer = (
                    [r] * len(job.layers)
                    if r is not None
                    else balanced_ranks(
                        len(job.layers), ratio_of(job, target) * m * n / (m + n), min(m, n), job.granularity
                    )
                )
                ranks.update({(layer, target): rk for layer, rk in zip(job.layers, per_layer)})

        layers = []
        for layer in job.layers:
            lp = LayerPlan(layer)
            for target in job.targets:
                lp.factors[target] = spectra[(layer, target)].factors(0, ranks[(layer, target)], cfg.beta)
            layers.append(lp)
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

    def _sensitivity(
        self,
        job: DecomposeJob,
        spectra: dict[tuple[int, str], Spectrum],
        shapes: dict[tuple[int, str], tuple[int, int]],
        samples: list,
        recorder: StageRecorder,
    ) -> tuple[dict[tuple[int, str], int], dict[str, Any]]:
        cfg = self.config
        probe = samples[: cfg.sensitivity_samples]
        keys = list(spectra)
        candidates: dict[tuple[int, str], list[int]] = {}
        for key in keys:
            m, n = shapes[key]
            cand = sorted({dense_rank(m, n, r, job.granularity) for r in cfg.sensitivity_ratios})
            candidates[key] = cand
        losses: dict[tuple[int, str], list[float]] = {}
        total = sum(len(c) for c in candidates.values())
        with recorder.stage("asvd: sensitivity", total=total + 1) as st:
            base = calibration_loss(job, probe)
            st.advance()
            for key in keys:

                def measure(key=key) -> dict[str, torch.Tensor]:
                    row = []
                    for rank in candidates[key]:
                        f = spectra[key].factors(0, rank, cfg.beta)
                        row.append(calibration_loss(job, probe, {key: f.A @ f.B}))
                        st.advance()
                    return {"losses": torch.tensor(row, dtype=torch.float64)}

                # A resumed run reuses each matrix's measured losses (float64 keeps them exact).
                parts = (
                    "asvd_sensitivity",
                    f"layer={key[0]}",
                    key[1],
                    f"ranks={candidates[key]}",
                    len(probe),
                )
                done = st.completed
                losses[key] = cached(job.cache, parts, measure)["losses"].tolist()
                st.advance(len(candidates[key]) - (st.completed - done))
        unit = {key: sum(shapes[key]) for key in keys}
        budget = sum(ratio_of(job, key[1]) * shapes[key][0] * shapes[key][1] for key in keys)
        params = [[r * unit[key] for r in candidates[key]] for key in keys]
        choice = sensitivity_allocation([losses[k] for k in keys], params, budget)
        coarse = [candidates[k][c] for k, c in zip(keys, choice)]
        # The most sensitive matrices (highest loss at their chosen rank) get the leftover budget first.
        order = sorted(range(len(keys)), key=lambda j: -losses[keys[j]][choice[j]])
        full = [min(shapes[k]) for k in keys]
        final = top_up(coarse, [unit[k] for k in keys], full, budget, order, job.granularity)
        table = {
            f"{layer}.{target}": {"ranks": candidates[(layer, target)], "losses": losses[(layer, target)]}
            for layer, target in keys
        }
        return dict(zip(keys, final)), {"base_loss": base, "candidates": table}
