"""``wsvd``: per-head whitened SVD with importance-based ranks and Fisher-weighted local fine-tuning (WSVD).

For every decoder layer the input Gram matrix gives one whitening factor ``S`` (shared by Q, K, V and
all their heads). Each head ``h`` of each target (a ``head_dim × n`` slice of the weight) is factored
on its own through the SVD of ``W_h S``. Ranks come from a global top-k of per-singular-value
importance scores ``I_i = σ_i · sqrt(mean_n (u_iᵀ G_n S^{-ᵀ} v_i)²)`` over all layers and heads,
separately for Q, K and V (each head keeps at least its top component), or from a uniform ρ1.

Local fine-tuning (Algorithm 1 of the paper) then refines every truncated head from its SVD start to
minimize ``‖F_h^{1/2} ⊙ (W_h − A_h B_h)‖² / ‖F_h^{1/2} ⊙ W_h‖²``, with ``F`` the element-wise Fisher of
the answer loss, by Adam on fp32 master factors. All heads of one layer train together: their factors
are padded to the layer's largest rank with masked columns, which is exactly equivalent to separate
optimizers because the loss is a sum over heads and Adam acts element-wise. Heads kept at full rank
are exact already and are left out; each head returns the best iterate it reached, so fine-tuning never
ends worse than the SVD start.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from lowrank_kit.calib_cache import cached
from lowrank_kit.methods.allocation import head_rank, importance_allocation
from lowrank_kit.methods.base import DecomposeJob, Decomposer, LayerPlan, MethodConfig, Plan
from lowrank_kit.methods.common import check_allocation, head_weights, plan_rho1, ratio_of, requested_rank
from lowrank_kit.methods.linalg import Spectrum, spectrum, whitening
from lowrank_kit.methods.stats import (
    ImportanceBasis,
    StageRecorder,
    collect_gradient_stats,
    collect_input_stats,
    require_calibration,
)
from lowrank_kit.modules import HeadFactors


class WSVDConfig(MethodConfig):
    beta: float = Field(0.5, ge=0.0, le=1.0, description="Σ split: A = U Σ^(1-β), B = Σ^β Vᵀ S⁻¹")
    whitening: Literal["eigen", "cholesky"] = Field(
        "eigen", description="whitening factor route: eigen (SVD-LLM V2) or cholesky (SVD-LLM)"
    )
    eps: float = Field(
        1e-6, gt=0.0, lt=1.0, description="eigenvalue floor (or Cholesky jitter) relative to the largest"
    )
    # Off by default: on held-out text of the real SmolLM2-135M, fine-tuning raised wsvd's perplexity at
    # rho1 0.5 and 0.3 (docs/methods.md, "Why, measured on the real layers"); the paper's recipes turn it on.
    finetune: bool = Field(
        False, description="Fisher-weighted local fine-tuning (the paper's Algorithm 1); off by default"
    )
    ft_steps: int = Field(100, ge=1, description="Adam steps of local fine-tuning")
    ft_lr: float = Field(1e-4, gt=0.0, description="Adam learning rate of local fine-tuning")


def finetune_heads(
    W: torch.Tensor,
    fisher: torch.Tensor,
    A: list[torch.Tensor],
    B: list[torch.Tensor],
    steps: int,
    lr: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Fisher-weighted refinement of N heads at once.

    ``W``, ``fisher``: (N, d, n); ``A[i]``: (d, r_i); ``B[i]``: (r_i, n). Returns the refined factors
    (the best iterate per head) and the per-head relative losses at the start and at the returned factors.
    """
    N, d, n = W.shape
    rmax = max(b.shape[0] for b in B)
    device = W.device
    mask = torch.zeros(N, 1, rmax, device=device)
    A_pad = torch.zeros(N, d, rmax, device=device)
    B_pad = torch.zeros(N, rmax, n, device=device)
    for i, (a, b) in enumerate(zip(A, B)):
        r = b.shape[0]
        mask[i, :, :r] = 1.0
        A_pad[i, :, :r] = a
        B_pad[i, :r] = b
    A_p = torch.nn.Parameter(A_pad)
    B_p = torch.nn.Parameter(B_pad)
    denom = (fisher * W * W).sum((1, 2))
    opt = torch.optim.Adam([A_p, B_p], lr=lr)
    best_A, best_B = A_pad.clone(), B_pad.clone()
    best = torch.full((N,), float("inf"), device=device)
    start = None
    for step in range(steps + 1):
        # Masking A's padded columns zeroes the gradients of both padded A columns and padded B rows.
        R = W - (A_p * mask) @ B_p
        per_head = (fisher * R * R).sum((1, 2)) / denom
        with torch.no_grad():
            if start is None:
                start = per_head.detach().clone()
            better = per_head < best
            best = torch.where(better, per_head, best)
            best_A[better] = A_p[better]
            best_B[better] = B_p[better]
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        per_head.sum().backward()
        opt.step()
    ranks = [b.shape[0] for b in B]
    out_A = [best_A[i, :, :r].clone() for i, r in enumerate(ranks)]
    out_B = [best_B[i, :r].clone() for i, r in enumerate(ranks)]
    return out_A, out_B, start, best


class WSVDDecomposer(Decomposer):
    name = "wsvd"
    config_class = WSVDConfig
    summary = "per-head whitened SVD, importance ranks, Fisher-weighted local fine-tuning (WSVD)"
    needs_calibration = True
    allocations = ("importance", "uniform")
    layout = "per_head"

    def decompose(self, job: DecomposeJob) -> Plan:
        cfg = self.config
        allocation = check_allocation(job, self.name, self.allocations)
        info = job.info
        d, n = info.head_dim, info.hidden_size
        recorder = StageRecorder(job.reporter, job.device)
        samples = require_calibration(job, self.name)
        stats = collect_input_stats(job, recorder, abs_mean=False, gram=True, samples=samples)

        spectra: dict[tuple[int, str], Spectrum] = {}
        whitening_info: dict[str, Any] = {}
        with recorder.stage("wsvd: whitened per-head SVD", total=len(job.layers)) as st:
            for layer in job.layers:
                transform = whitening(
                    stats.gram.pop(layer), cfg.whitening, cfg.eps, where=f" of layer {layer}"
                )
                whitening_info[str(layer)] = transform.info()
                for target in job.targets:
                    spectra[(layer, target)] = spectrum(head_weights(job, layer, target), transform)
                del transform
                st.advance()

        fixed = {t: requested_rank(job, t, min(d, n), f"one head of {t} ({d}×{n})") for t in job.targets}
        needs_importance = allocation == "importance"
        report: dict[str, Any] = {}
        grads = None
        if needs_importance or cfg.finetune:
            bases = (
                {key: ImportanceBasis(spec, (key[1],)) for key, spec in spectra.items()}
                if needs_importance
                else None
            )
            grads = collect_gradient_stats(job, recorder, fisher=cfg.finetune, bases=bases, samples=samples)
            report["calibration_loss"] = grads.mean_loss

        keep: dict[tuple[int, str], list[torch.Tensor]] = {}
        for target in job.targets:
            keys = [(layer, target) for layer in job.layers]
            heads = info.heads_of(target)
            if needs_importance:
                budget = ratio_of(job, target) * len(keys) * heads * d * n / (n + d)
                scores = [grads.importance[key][h] for key in keys for h in range(heads)]
                chosen = importance_allocation(scores, budget, job.granularity, what=f"{target} heads")
                for i, key in enumerate(keys):
                    keep[key] = chosen[i * heads : (i + 1) * heads]
            else:
                r = fixed[target]
                if r is None:
                    r = head_rank(d, n, ratio_of(job, target), job.granularity)
                for key in keys:
                    keep[key] = [torch.arange(r)] * heads

        factors: dict[tuple[int, str], HeadFactors] = {}
        for key, spec in spectra.items():
            parts = [spec.factors(h, idx, cfg.beta) for h, idx in enumerate(keep[key])]
            factors[key] = HeadFactors([p.A for p in parts], [p.B for p in parts])
        del spectra

        if cfg.finetune:
            report["finetune"] = self._finetune(job, factors, grads.fisher, recorder)

        layers = []
        for layer in job.layers:
            lp = LayerPlan(layer)
            for target in job.targets:
                lp.factors[target] = factors[(layer, target)]
            layers.append(lp)
        plan = Plan(layers)
        plan.report.update(
            {
                "planned_rho1": plan_rho1(job, plan),
                "calibration_tokens": stats.tokens,
                "whitening": whitening_info,
                **report,
                **recorder.report(),
            }
        )
        return plan

    def _finetune(
        self,
        job: DecomposeJob,
        factors: dict[tuple[int, str], HeadFactors],
        fisher: dict[tuple[int, str], torch.Tensor],
        recorder: StageRecorder,
    ) -> dict[str, Any]:
        cfg = self.config
        d = job.info.head_dim
        full = min(d, job.info.hidden_size)
        tuned, skipped_zero_fisher = 0, 0
        start_sum, end_sum = 0.0, 0.0
        with recorder.stage("wsvd: local fine-tuning", total=len(job.layers)) as st:
            for layer in job.layers:
                slots, Ws, Fs, As, Bs = [], [], [], [], []
                for target in job.targets:
                    key = (layer, target)
                    W = head_weights(job, layer, target)
                    Fh = fisher.pop(key).view_as(W)
                    f = factors[key]
                    for h, rank in enumerate(f.ranks):
                        if rank >= full:
                            continue
                        if not bool((Fh[h] > 0).any()):
                            # No calibration gradient reached this head: its weighted loss is 0/0.
                            skipped_zero_fisher += 1
                            continue
                        slots.append((key, h))
                        Ws.append(W[h])
                        Fs.append(Fh[h])
                        As.append(f.A[h])
                        Bs.append(f.B[h])
                if slots:

                    def tune(Ws=Ws, Fs=Fs, As=As, Bs=Bs) -> dict[str, torch.Tensor]:
                        with torch.enable_grad():
                            A, B, start, end = finetune_heads(
                                torch.stack(Ws), torch.stack(Fs), As, Bs, cfg.ft_steps, cfg.ft_lr
                            )
                        return {"start": start, "end": end} | {
                            f"{kind}.{i}": t for kind, ts in (("A", A), ("B", B)) for i, t in enumerate(ts)
                        }

                    # A resumed run reuses each layer's tuned factors instead of tuning it again.
                    parts = ("wsvd_finetune", f"layer={layer}", f"heads={len(slots)}")
                    done = {k: v.to(job.device) for k, v in cached(job.cache, parts, tune).items()}
                    start, end = done["start"], done["end"]
                    new_A = [done[f"A.{i}"] for i in range(len(slots))]
                    new_B = [done[f"B.{i}"] for i in range(len(slots))]
                    for (key, h), a, b in zip(slots, new_A, new_B):
                        factors[key].A[h] = a.detach()
                        factors[key].B[h] = b.detach()
                    tuned += len(slots)
                    start_sum += float(start.sum())
                    end_sum += float(end.sum())
                st.advance()
        return {
            "heads_tuned": tuned,
            "heads_without_fisher": skipped_zero_fisher,
            "mean_loss_before": start_sum / tuned if tuned else 0.0,
            "mean_loss_after": end_sum / tuned if tuned else 0.0,
            "steps": cfg.ft_steps,
            "lr": cfg.ft_lr,
        }
