"""Helpers for the method tests: calibration samples for tiny models, jobs, full ranks, logits."""

import pytest
import torch

from lowrank_kit.data.calibration import CalibrationSample
from lowrank_kit.methods.base import DecomposeJob
from lowrank_kit.models.tiny import TINY_FAMILIES, family_available, tiny_inputs
from lowrank_kit.registry import adapter_for_config

TARGETS = ("q_proj", "k_proj", "v_proj")

FAMILIES = [
    pytest.param(
        f,
        marks=pytest.mark.skipif(
            not family_available(f), reason=f"this transformers lacks the {f} model class"
        ),
    )
    for f in TINY_FAMILIES
]


def make_samples(model, n: int = 3, answer_tokens: int = 3, seed: int = 0) -> list[CalibrationSample]:
    """``n`` samples of the tiny model's inputs whose last ``answer_tokens`` positions are the answer."""
    samples = []
    for i in range(n):
        inputs = tiny_inputs(model, seed=seed + i)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -answer_tokens:] = inputs["input_ids"][:, -answer_tokens:]
        samples.append(CalibrationSample(inputs, labels))
    return samples


def make_job(
    model, *, samples=None, ratios=None, ranks=None, allocation="uniform", granularity=1, targets=TARGETS
):
    adapter = adapter_for_config(model.config)
    return DecomposeJob(
        model=model,
        adapter=adapter,
        info=adapter.info(model),
        targets=tuple(targets),
        ratios=dict(ratios or {}),
        ranks=ranks,
        allocation=allocation,
        granularity=granularity,
        calibration=samples,
    )


def full_ranks(info, layout: str) -> dict[str, int]:
    """The rank at which each layout's factorization is exact for q/k/v."""
    if layout == "per_head":
        return dict.fromkeys(TARGETS, min(info.head_dim, info.hidden_size))
    if layout == "joint":
        return dict.fromkeys(TARGETS, min(sum(info.out_features(t) for t in TARGETS), info.hidden_size))
    return {t: min(info.out_features(t), info.hidden_size) for t in TARGETS}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def projection_inputs(job, samples, layer: int, target: str = "q_proj") -> torch.Tensor:
    """Every token row that ``target`` of ``layer`` receives over ``samples`` (fp64), captured independently."""
    seen = []
    handle = job.projection(layer, target).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    try:
        with torch.no_grad():
            for sample in samples:
                job.model(**sample.inputs)
    finally:
        handle.remove()
    return torch.cat(seen).double()
