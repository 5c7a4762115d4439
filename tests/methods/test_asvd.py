"""asvd: activation-aware scaling and the sensitivity-based rank search."""

import pytest
import torch
from method_helpers import TARGETS, make_job, make_samples, projection_inputs

from lowrank_kit.methods.asvd import ASVDConfig, ASVDDecomposer
from lowrank_kit.models.tiny import build_tiny_model


def test_factors_are_the_scaled_svd_with_the_scale_folded_back():
    model = build_tiny_model("llava")
    samples = make_samples(model, n=2)
    job = make_job(model, samples=samples, ranks=dict.fromkeys(TARGETS, 11))
    plan = ASVDDecomposer(ASVDConfig(alpha=0.5)).decompose(job)
    s = projection_inputs(job, samples, 0, "v_proj").abs().mean(0)
    W = job.weight(0, "v_proj").double()
    r = 11
    U, sig, Vh = torch.linalg.svd(W * s.sqrt(), full_matrices=False)
    expected = (U[:, :r] * sig[:r]) @ Vh[:r] / s.sqrt()
    f = plan.layers[0].factors["v_proj"]
    assert f.rank == r
    # fp32-stored factors of a 32×64 matrix: ~1e-6 relative.
    assert float((f.A.double() @ f.B.double() - expected).norm() / expected.norm()) < 1e-5


def test_uniform_ranks_meet_each_targets_budget_across_layers():
    model = build_tiny_model("llava")
    job = make_job(model, samples=make_samples(model), ratios=dict.fromkeys(TARGETS, 0.6))
    plan = ASVDDecomposer().decompose(job)
    for t in TARGETS:
        m, n = job.info.out_features(t), job.info.hidden_size
        ranks = [lp.factors[t].rank for lp in plan.layers]
        assert max(ranks) - min(ranks) <= 1
        assert abs(sum(ranks) - 0.6 * m * n / (m + n) * len(ranks)) <= 0.5


def test_sensitivity_search_meets_the_budget_and_reports_its_table():
    model = build_tiny_model("qwen2_5_vl")
    job = make_job(
        model, samples=make_samples(model), ratios=dict.fromkeys(TARGETS, 0.5), allocation="sensitivity"
    )
    cfg = ASVDConfig(sensitivity_ratios=[0.2, 0.4, 0.6, 0.8, 1.0], sensitivity_samples=2)
    plan = ASVDDecomposer(cfg).decompose(job)
    info = job.info
    n = info.hidden_size
    budget = sum(0.5 * info.out_features(t) * n for t in TARGETS) * info.num_layers
    used = sum(f.num_params for lp in plan.layers for f in lp.factors.values())
    largest_step = max(info.out_features(t) + n for t in TARGETS)
    # The threshold search lands at or under the budget; the top-up spends all but less than one step.
    assert budget - largest_step < used <= budget
    table = plan.report["sensitivity"]["candidates"]
    assert set(table) == {f"{layer}.{t}" for layer in range(info.num_layers) for t in TARGETS}
    assert all(len(row["losses"]) == len(row["ranks"]) for row in table.values())
    assert plan.report["stages"][-1]["stage"] == "asvd: sensitivity"


def test_sensitivity_on_an_impossible_budget_is_an_error():
    model = build_tiny_model("llava")
    job = make_job(
        model, samples=make_samples(model), ratios=dict.fromkeys(TARGETS, 0.05), allocation="sensitivity"
    )
    cfg = ASVDConfig(sensitivity_ratios=[0.5, 1.0], sensitivity_samples=1)
    with pytest.raises(Exception, match="fewer than the .* of the smallest candidate ratio"):
        ASVDDecomposer(cfg).decompose(job)


def test_config_validation():
    with pytest.raises(ValueError, match="distinct, ascending and in"):
        ASVDConfig(sensitivity_ratios=[0.5, 0.2])
    with pytest.raises(ValueError, match="alpha"):
        ASVDConfig(alpha=-1.0)
