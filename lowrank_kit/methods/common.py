"""Plumbing the calibrated decomposers share: rank requests, weights grouped by head, plan reports."""

from __future__ import annotations

import torch

from lowrank_kit.errors import RecipeError
from lowrank_kit.methods.allocation import check_fixed_rank
from lowrank_kit.methods.base import DecomposeJob, Plan


def check_allocation(job: DecomposeJob, method: str, accepted: tuple[str, ...]) -> str:
    if job.allocation not in accepted:
        raise RecipeError(
            f"method {method!r} supports rank allocation {', '.join(accepted)}, got {job.allocation!r}"
        )
    if job.ranks and job.allocation != "uniform":
        raise RecipeError(
            f"rank allocation {job.allocation!r} chooses ranks to meet a ratio, but the recipe gives an "
            f"explicit rank {sorted(set(job.ranks.values()))}; give `ratio` instead, or rank_allocation: uniform"
        )
    return job.allocation


def requested_rank(job: DecomposeJob, target: str, full: int, what: str) -> int | None:
    """The explicit rank the recipe asks for ``target`` (checked against ``full``), or None."""
    if job.ranks and target in job.ranks:
        return check_fixed_rank(job.ranks[target], full, what)
    return None


def ratio_of(job: DecomposeJob, target: str) -> float:
    if target not in job.ratios:
        raise RecipeError(
            f"no ratio or rank for target {target!r}; give `ratio`, `ratios` with every target, or `rank`"
        )
    return float(job.ratios[target])


def head_weights(job: DecomposeJob, layer: int, target: str) -> torch.Tensor:
    """W of ``target`` as (heads, head_dim, n), fp32 on ``job.device``."""
    W = job.weight(layer, target)
    return W.view(job.info.heads_of(target), job.info.head_dim, W.shape[-1])


def plan_rho1(job: DecomposeJob, plan: Plan) -> dict[str, float]:
    """ρ1 of the plan per target and over all targets (joint factors: their shared latent counted once)."""
    kept: dict[str, int] = dict.fromkeys(job.targets, 0)
    total: dict[str, int] = dict.fromkeys(job.targets, 0)
    joint_kept, joint_total = 0, 0
    for lp in plan.layers:
        for target, f in lp.factors.items():
            kept[target] += f.num_params
            total[target] += job.info.out_features(target) * job.info.hidden_size
        if lp.joint is not None:
            joint_kept += lp.joint.num_params
            joint_total += sum(a.shape[0] for a in lp.joint.A.values()) * lp.joint.B.shape[1]
    out = {t: kept[t] / total[t] for t in job.targets if total[t]}
    all_kept, all_total = sum(kept.values()) + joint_kept, sum(total.values()) + joint_total
    out["all"] = all_kept / all_total if all_total else 0.0
    return out
