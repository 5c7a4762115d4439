"""qsvd: one joint SVD of the stacked Q/K/V per layer, shared latent, importance ranks over layers."""

import pytest
import torch
from method_helpers import TARGETS, make_job, make_samples, projection_inputs

from lowrank_kit.errors import RecipeError
from lowrank_kit.methods.qsvd import QSVDDecomposer
from lowrank_kit.models.tiny import build_tiny_model
from lowrank_kit.modules import JointLowRankProjection
from lowrank_kit.ratios import compute_ratios
from lowrank_kit.surgery import apply_plan


def _job(model, ratio=0.5, **kw):
    return make_job(model, samples=make_samples(model), ratios=dict.fromkeys(TARGETS, ratio), **kw)


@pytest.mark.parametrize("allocation", ["importance", "uniform"])
def test_one_shared_latent_per_layer_and_the_budget(allocation):
    model = build_tiny_model("qwen2_vl")
    job = _job(model, 0.5, allocation=allocation)
    plan = QSVDDecomposer().decompose(job)
    info = job.info
    n, m = info.hidden_size, sum(info.out_features(t) for t in TARGETS)
    ranks = [lp.joint.rank for lp in plan.layers]
    for lp in plan.layers:
        assert not lp.factors and set(lp.joint.A) == set(TARGETS)
        assert all(lp.joint.A[t].shape == (info.out_features(t), lp.joint.rank) for t in TARGETS)
    per_layer = 0.5 * m * n / (n + m)
    assert abs(sum(ranks) - per_layer * info.num_layers) <= 0.5
    if allocation == "uniform":
        assert max(ranks) - min(ranks) <= 1
    apply_plan(model, job.adapter, plan)
    k = job.adapter.get_projection(model, 0, "k_proj")
    v = job.adapter.get_projection(model, 0, "v_proj")
    assert isinstance(k, JointLowRankProjection) and k.shared is v.shared
    ratios = compute_ratios(model, job.adapter)
    assert ratios.rho2 == pytest.approx(
        sum(ranks) / (2 * info.num_kv_heads * info.head_dim * info.num_layers)
    )
    assert ratios.rho1 == pytest.approx(plan.report["planned_rho1"]["all"], abs=1e-12)


def test_joint_factors_are_the_scaled_svd_of_the_stacked_matrix():
    model = build_tiny_model("llava")
    samples = make_samples(model)
    job = make_job(model, samples=samples, ranks=dict.fromkeys(TARGETS, 20))
    plan = QSVDDecomposer().decompose(job)
    scale = projection_inputs(job, samples, 1).abs().mean(0).sqrt()  # s^α with α = 0.5
    W = torch.cat([job.weight(1, t) for t in TARGETS]).double()
    U, sig, Vh = torch.linalg.svd(W * scale, full_matrices=False)
    expected = (U[:, :20] * sig[:20]) @ Vh[:20] / scale
    got = torch.cat([plan.layers[1].joint.A[t] for t in TARGETS]).double() @ plan.layers[1].joint.B.double()
    # fp32-stored factors: ~1e-6 relative.
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_granularity_rounds_every_layer_rank():
    model = build_tiny_model("llava")
    plan = QSVDDecomposer().decompose(_job(model, 0.5, allocation="importance", granularity=8))
    assert all(lp.joint.rank % 8 == 0 for lp in plan.layers)


def test_different_explicit_ranks_per_target_are_an_error():
    model = build_tiny_model("llava")
    job = make_job(model, samples=make_samples(model), ranks={"q_proj": 4, "k_proj": 5, "v_proj": 4})
    with pytest.raises(RecipeError, match="qsvd shares one latent across q_proj, k_proj, v_proj; got ranks"):
        QSVDDecomposer().decompose(job)


def test_a_tiny_ratio_still_keeps_rank_one_per_layer():
    model = build_tiny_model("smolvlm")
    plan = QSVDDecomposer().decompose(_job(model, 0.02, allocation="importance"))
    assert all(lp.joint.rank >= 1 for lp in plan.layers)
    assert torch.isfinite(torch.tensor(plan.report["calibration_loss"]))
