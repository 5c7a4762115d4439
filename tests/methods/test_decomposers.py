"""Properties every calibrated decomposer must have, on tiny models of every family."""

import pytest
import torch
from method_helpers import FAMILIES, TARGETS, full_ranks, logits, make_job, make_samples, rel

from lowrank_kit.errors import CalibrationError, RecipeError
from lowrank_kit.methods.asvd import ASVDDecomposer
from lowrank_kit.methods.qsvd import QSVDDecomposer
from lowrank_kit.methods.svdllm import SVDLLMDecomposer
from lowrank_kit.methods.wsvd import WSVDDecomposer
from lowrank_kit.models.tiny import build_tiny_model, tiny_inputs
from lowrank_kit.pipeline import compress
from lowrank_kit.ratios import compute_ratios
from lowrank_kit.recipe import recipe_from_flags
from lowrank_kit.registry import get_decomposer
from lowrank_kit.surgery import apply_plan

METHODS = {
    "asvd": ASVDDecomposer,
    "svdllm": SVDLLMDecomposer,
    "qsvd": QSVDDecomposer,
    "wsvd": WSVDDecomposer,
}
# fp32 forward of a 2-layer model; an exact refactorization differs only by rounding (~1e-6), and
# whitening with a floored rank-deficient Gram matrix adds at most a factor ~1e3 of conditioning.
FULL_RANK_RTOL = 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_full_rank_reproduces_the_logits(method, family):
    model = build_tiny_model(family)
    # Three short samples: fewer calibration tokens than channels, so every Gram matrix is singular.
    samples = make_samples(model, n=3)
    cls = METHODS[method]
    job = make_job(model, samples=samples, ranks=full_ranks(model_info(model), cls.layout))
    plan = cls().decompose(job)
    inputs = tiny_inputs(model, seed=99)  # inputs the calibration never saw
    ref = logits(model, inputs)
    apply_plan(model, job.adapter, plan)
    assert type(job.adapter.get_projection(model, 1, "v_proj")).__name__ != "Linear"
    assert rel(logits(model, inputs), ref) < FULL_RANK_RTOL


def model_info(model):
    return make_job(model).info


@pytest.mark.parametrize("method", sorted(METHODS))
def test_decompose_leaves_the_model_untouched(method):
    model = build_tiny_model("qwen2_vl")
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    cls = METHODS[method]
    job = make_job(
        model, samples=make_samples(model), ratios=dict.fromkeys(TARGETS, 0.5), allocation=cls.allocations[0]
    )
    plan = cls().decompose(job)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n
    assert not model.training
    for lp in plan.layers:
        factors = list(lp.factors.values()) + ([lp.joint] if lp.joint else [])
        for f in factors:
            tensors = f.A.values() if isinstance(f.A, dict) else (f.A if isinstance(f.A, list) else [f.A])
            assert all(t.dtype == torch.float32 for t in tensors)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_planned_rho1_is_what_the_installed_modules_count(method):
    model = build_tiny_model("smolvlm")
    cls = METHODS[method]
    job = make_job(
        model, samples=make_samples(model), ratios=dict.fromkeys(TARGETS, 0.6), allocation=cls.allocations[0]
    )
    plan = cls().decompose(job)
    apply_plan(model, job.adapter, plan)
    assert compute_ratios(model, job.adapter).rho1 == pytest.approx(
        plan.report["planned_rho1"]["all"], abs=1e-12
    )
    stages = plan.report["stages"]
    assert stages[0]["stage"] == "calibration: activations"
    assert all(s["seconds"] >= 0 and s["peak_rss_bytes"] > 0 for s in stages)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compress_runs_every_method_through_the_pipeline(method):
    model = build_tiny_model("llava")
    samples = make_samples(model, n=4)
    result = compress(model, recipe_from_flags(model="llava", method=method, ratio=0.6), calibration=samples)
    report = result.report
    assert report["method"] == method
    # Tiny heads (16×64): one rank step per head moves ρ1 by ~1/13 of that head; the global
    # allocations land within a few hundredths, the uniform ones within half a step per matrix.
    assert abs(report["rho1"] - 0.6) < 0.05
    assert report["decompose"]["stages"]
    assert report["decompose"]["rank_allocation"] == get_decomposer(method).allocations[0]
    out = model.generate(**tiny_inputs(model), max_new_tokens=3, do_sample=False)
    assert out.shape[-1] >= 3


@pytest.mark.parametrize("method", sorted(METHODS))
def test_missing_calibration_is_a_clear_error(method):
    model = build_tiny_model("llava")
    job = make_job(
        model, samples=None, ratios=dict.fromkeys(TARGETS, 0.5), allocation=METHODS[method].allocations[0]
    )
    with pytest.raises(CalibrationError, match=f"method '{method}' needs calibration samples, got none"):
        METHODS[method]().decompose(job)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unsupported_allocation_and_rank_with_search_are_errors(method):
    model = build_tiny_model("llava")
    cls = METHODS[method]
    job = make_job(model, samples=make_samples(model), ratios=dict.fromkeys(TARGETS, 0.5), allocation="magic")
    with pytest.raises(RecipeError, match=f"method '{method}' supports rank allocation .*, got 'magic'"):
        cls().decompose(job)
    searched = [a for a in cls.allocations if a != "uniform"]
    for allocation in searched:
        job = make_job(
            model, samples=make_samples(model), ranks=dict.fromkeys(TARGETS, 4), allocation=allocation
        )
        with pytest.raises(
            RecipeError, match=f"rank allocation '{allocation}' chooses ranks to meet a ratio"
        ):
            cls().decompose(job)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_impossible_explicit_rank_is_an_error(method):
    model = build_tiny_model("llava")
    job = make_job(model, samples=make_samples(model), ranks=dict.fromkeys(TARGETS, 1000))
    with pytest.raises(RecipeError, match="rank 1000 is impossible for"):
        METHODS[method]().decompose(job)


def test_configs_reject_typos_and_carry_the_papers_defaults():
    assert ASVDDecomposer.config_class().alpha == 0.5
    assert QSVDDecomposer.config_class().alpha == 0.5 and QSVDDecomposer.config_class().beta == 0.5
    wsvd = WSVDDecomposer.config_class()
    assert (wsvd.finetune, wsvd.ft_steps, wsvd.ft_lr, wsvd.whitening) == (False, 100, 1e-4, "eigen")
    with pytest.raises(ValueError, match="ft_step"):
        WSVDDecomposer.config_class(ft_step=3)
