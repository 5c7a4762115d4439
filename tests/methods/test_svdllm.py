"""svdllm: whitened truncation, the output-error optimum on the calibration inputs."""

import pytest
from method_helpers import TARGETS, make_job, make_samples, projection_inputs

from lowrank_kit.methods.asvd import ASVDDecomposer
from lowrank_kit.methods.svd import SVDDecomposer
from lowrank_kit.methods.svdllm import SVDLLMConfig, SVDLLMDecomposer
from lowrank_kit.models.tiny import build_tiny_model


def test_whitened_truncation_has_the_lowest_output_error_on_calibration_inputs():
    model = build_tiny_model("llava_next")
    samples = make_samples(model, n=2)
    job = make_job(model, samples=samples, ranks=dict.fromkeys(TARGETS, 5))
    plans = {
        "svdllm": SVDLLMDecomposer().decompose(job),
        "svd": SVDDecomposer().decompose(job),
        "asvd": ASVDDecomposer().decompose(job),
    }
    for layer in job.layers:
        X = projection_inputs(job, samples, layer)
        for t in TARGETS:
            W = job.weight(layer, t).double()
            err = {}
            for name, plan in plans.items():
                f = plan.layers[layer].factors[t]
                err[name] = float(((W - f.A.double() @ f.B.double()) @ X.T).norm())
            # Eckart–Young in the whitened space: nothing of rank 5 does better on these inputs
            # (up to the floor on the Gram matrix's null space, which these inputs do not reach).
            assert err["svdllm"] <= err["svd"] * (1 + 1e-6)
            assert err["svdllm"] <= err["asvd"] * (1 + 1e-6)


def test_uniform_ratio_meets_each_targets_budget_with_near_equal_ranks():
    model = build_tiny_model("smolvlm")
    ratios = {"q_proj": 0.5, "k_proj": 0.3, "v_proj": 0.7}
    job = make_job(model, samples=make_samples(model), ratios=ratios)
    plan = SVDLLMDecomposer().decompose(job)
    for t, ratio in ratios.items():
        m, n = job.info.out_features(t), job.info.hidden_size
        ranks = [lp.factors[t].rank for lp in plan.layers]
        assert max(ranks) - min(ranks) <= 1
        assert abs(sum(ranks) - ratio * m * n / (m + n) * len(ranks)) <= 0.5
    assert plan.report["whitening"]["0"]["route"] == "eigen"


def test_cholesky_route_reports_its_jitter_on_a_singular_gram():
    model = build_tiny_model("llava")
    job = make_job(model, samples=make_samples(model, n=1), ratios=dict.fromkeys(TARGETS, 0.5))
    plan = SVDLLMDecomposer(SVDLLMConfig(whitening="cholesky")).decompose(job)
    assert all(w["jitter"] > 0 for w in plan.report["whitening"].values())  # 11 tokens, 64 channels


def test_config_validation():
    with pytest.raises(ValueError, match="eps"):
        SVDLLMConfig(eps=0.0)
