"""wsvd: per-head whitened SVD, importance allocation per target, Fisher-weighted local fine-tuning."""

import copy

import pytest
import torch
from method_helpers import TARGETS, make_job, make_samples

from lowrank_kit.errors import RecipeError
from lowrank_kit.methods.linalg import spectrum, whitening
from lowrank_kit.methods.stats import StageRecorder, collect_input_stats
from lowrank_kit.methods.wsvd import WSVDConfig, WSVDDecomposer, finetune_heads
from lowrank_kit.models.tiny import build_tiny_model
from lowrank_kit.ratios import compute_ratios
from lowrank_kit.surgery import apply_plan


def _heads(N=5, d=6, n=20, ranks=(1, 3, 6, 2, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, d, n, generator=gen)
    F = torch.rand(N, d, n, generator=gen) ** 4  # uneven weights, as Fisher values are
    A, B = [], []
    for i, r in enumerate(ranks):
        U, s, Vh = torch.linalg.svd(W[i], full_matrices=False)
        A.append(U[:, :r] * s[:r].sqrt())
        B.append(s[:r].sqrt()[:, None] * Vh[:r])
    return W, F, A, B


def test_batched_fine_tuning_equals_one_optimizer_per_head():
    W, F, A, B = _heads()
    bA, bB, start, end = finetune_heads(W, F, A, B, steps=30, lr=1e-2)
    for i in range(len(A)):
        sA, sB, s_start, s_end = finetune_heads(W[i : i + 1], F[i : i + 1], [A[i]], [B[i]], steps=30, lr=1e-2)
        assert bA[i].shape == A[i].shape and bB[i].shape == B[i].shape
        # Same arithmetic up to the order of summation inside the batched matmul: fp32 rounding.
        assert torch.allclose(bA[i], sA[0], atol=1e-5) and torch.allclose(bB[i], sB[0], atol=1e-5)
        assert float(end[i]) == pytest.approx(float(s_end[0]), rel=1e-4)
        assert float(start[i]) == pytest.approx(float(s_start[0]), rel=1e-5)


def test_fine_tuning_lowers_the_weighted_error_and_never_ends_worse():
    W, F, A, B = _heads(seed=1)
    _, _, start, end = finetune_heads(W, F, A, B, steps=50, lr=1e-2)
    assert (end <= start).all()
    assert float(end.sum()) < 0.9 * float(start.sum())
    # A learning rate far too large for these factors: the best iterate is the start itself.
    _, _, start, end = finetune_heads(W, F, A, B, steps=5, lr=10.0)
    assert torch.equal(end, start)


def test_fine_tuning_starts_from_the_exact_relative_loss():
    W, F, A, B = _heads(seed=2)
    _, _, start, _ = finetune_heads(W, F, A, B, steps=1, lr=1e-4)
    for i in range(len(A)):
        expected = (F[i] * (W[i] - A[i] @ B[i]) ** 2).sum() / (F[i] * W[i] ** 2).sum()
        assert float(start[i]) == pytest.approx(float(expected), rel=1e-5)


def _job(model, ratio=0.5, **kw):
    return make_job(model, samples=make_samples(model, n=4), ratios=dict.fromkeys(TARGETS, ratio), **kw)


@pytest.mark.parametrize("granularity", [1, 4])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_importance_allocation_hits_rho1_within_one_step_per_head(ratio, granularity):
    model = build_tiny_model("qwen2_vl")  # GQA 4:2 with q/k/v biases
    job = _job(model, ratio, allocation="importance", granularity=granularity)
    plan = WSVDDecomposer(WSVDConfig(finetune=False)).decompose(job)
    info = job.info
    d, n = info.head_dim, info.hidden_size
    for target in TARGETS:
        heads = info.heads_of(target)
        step = granularity * (n + d) / (d * n) / (heads * info.num_layers)
        assert abs(plan.report["planned_rho1"][target] - ratio) <= step
        for lp in plan.layers:
            ranks = lp.factors[target].ranks
            assert len(ranks) == heads
            assert all(r % granularity == 0 and r >= granularity for r in ranks)


def test_importance_allocation_differs_from_uniform_and_keeps_the_budget():
    model = build_tiny_model("llava")
    imp = WSVDDecomposer(WSVDConfig(finetune=False)).decompose(_job(model, allocation="importance"))
    uni = WSVDDecomposer(WSVDConfig(finetune=False)).decompose(_job(model, allocation="uniform"))
    imp_ranks = [r for lp in imp.layers for f in lp.factors.values() for r in f.ranks]
    uni_ranks = [r for lp in uni.layers for f in lp.factors.values() for r in f.ranks]
    assert len(set(uni_ranks)) == 1
    assert len(set(imp_ranks)) > 1
    # Each target's budget is 0.5·d·n/(n+d) = 6.4 components per head; uniform rounds every head to 6,
    # importance keeps the exact total to the nearest component per target.
    info = make_job(model).info
    for target in TARGETS:
        total = sum(sum(lp.factors[target].ranks) for lp in imp.layers)
        assert abs(total - 6.4 * info.heads_of(target) * info.num_layers) <= 0.5
    assert uni_ranks[0] == 6


def test_no_fine_tuning_gives_the_whitened_per_head_truncation():
    model = build_tiny_model("llava")
    job = _job(model, allocation="uniform")
    plan = WSVDDecomposer(WSVDConfig(finetune=False)).decompose(job)
    assert "wsvd: local fine-tuning" not in [s["stage"] for s in plan.report["stages"]]
    stats = collect_input_stats(job, StageRecorder(job.reporter, "cpu"), abs_mean=False)
    W = job.weight(1, "k_proj").view(job.info.num_kv_heads, job.info.head_dim, -1)
    spec = spectrum(W, whitening(stats.gram[1]))
    f = plan.layers[1].factors["k_proj"]
    for h, r in enumerate(f.ranks):
        expected = spec.factors(h, r, 0.5)
        assert torch.allclose(f.A[h], expected.A, atol=1e-6) and torch.allclose(f.B[h], expected.B, atol=1e-6)


def test_fine_tuning_improves_the_fisher_weighted_error_on_a_model():
    model = build_tiny_model("molmo2") if _has_molmo2() else build_tiny_model("smolvlm")
    job = _job(model, ratio=0.4, allocation="importance")
    plan = WSVDDecomposer(WSVDConfig(finetune=True, ft_steps=50, ft_lr=1e-3)).decompose(job)
    ft = plan.report["finetune"]
    assert ft["heads_tuned"] == sum(job.info.heads_of(t) for t in TARGETS) * job.info.num_layers
    assert ft["mean_loss_after"] < ft["mean_loss_before"]
    assert plan.report["stages"][-1]["stage"] == "wsvd: local fine-tuning"


def _has_molmo2():
    import transformers

    return hasattr(transformers, "Molmo2ForConditionalGeneration")


def test_cache_ratio_counts_per_head_latents_of_k_and_v():
    model = build_tiny_model("smolvlm")
    job = _job(model, allocation="importance")
    plan = WSVDDecomposer(WSVDConfig(finetune=False)).decompose(job)
    apply_plan(model, job.adapter, plan)
    info = job.info
    kv = sum(sum(lp.factors[t].ranks) for lp in plan.layers for t in ("k_proj", "v_proj"))
    expected = kv / (2 * info.num_kv_heads * info.head_dim * info.num_layers)
    assert compute_ratios(model, job.adapter).rho2 == pytest.approx(expected, abs=1e-12)


def test_cholesky_route_gives_the_same_factors_on_a_well_conditioned_gram():
    model = build_tiny_model("llava")
    samples = make_samples(model, n=10)  # 110 tokens over 64 channels: a full-rank Gram matrix
    job = make_job(model, samples=samples, ratios=dict.fromkeys(TARGETS, 0.5), allocation="uniform")
    eig = WSVDDecomposer(WSVDConfig(finetune=False)).decompose(job)
    chol = WSVDDecomposer(WSVDConfig(finetune=False, whitening="cholesky")).decompose(job)
    assert chol.report["whitening"]["0"]["jitter"] == 0.0
    for a, b in zip(eig.layers, chol.layers):
        for t in TARGETS:
            for h in range(len(a.factors[t].A)):
                pa = a.factors[t].A[h] @ a.factors[t].B[h]
                pb = b.factors[t].A[h] @ b.factors[t].B[h]
                # Both are the same optimal truncation; they differ by fp32 storage of the spectra.
                assert torch.allclose(pa, pb, atol=1e-4, rtol=1e-3)


def test_a_ratio_below_the_per_head_floor_is_an_error():
    model = build_tiny_model("llava")
    job = _job(model, ratio=0.05, allocation="importance", granularity=4)
    with pytest.raises(
        RecipeError,
        match=r"leaves 5\.1 rank units for q_proj heads, fewer than the 32 needed to keep one granularity step \(4\)",
    ):
        WSVDDecomposer(WSVDConfig(finetune=False)).decompose(job)


def test_config_validation():
    with pytest.raises(ValueError, match="ft_lr"):
        WSVDConfig(ft_lr=0.0)
    with pytest.raises(ValueError, match="whitening"):
        WSVDConfig(whitening="qr")


def test_fine_tuned_factors_are_what_the_model_runs_and_meet_an_independent_fisher_objective():
    # GQA 4:2, so a wrong head slice of K/V (or of their Fisher) would show up as a mismatch.
    model = build_tiny_model("llava")
    samples = make_samples(model, n=6)
    ref = copy.deepcopy(model)
    fisher = {}
    for s in samples:
        ref.zero_grad()
        ref(**s.inputs, labels=s.labels).loss.backward()
        for layer in range(2):
            for t in TARGETS:
                g = make_job(ref).projection(layer, t).weight.grad
                fisher[(layer, t)] = fisher.get((layer, t), 0) + g * g / len(samples)
    job = make_job(model, samples=samples, ratios=dict.fromkeys(TARGETS, 0.5), allocation="importance")
    plan = WSVDDecomposer(WSVDConfig(finetune=True, ft_steps=50, ft_lr=1e-3)).decompose(job)
    no_ft = WSVDDecomposer(WSVDConfig(finetune=False)).decompose(
        make_job(model, samples=samples, ratios=dict.fromkeys(TARGETS, 0.5), allocation="importance")
    )
    compressed = make_job(apply_plan(copy.deepcopy(model), job.adapter, plan))
    d, before, after, heads = job.info.head_dim, [], [], 0
    for layer in range(2):
        for t in TARGETS:
            mod = compressed.projection(layer, t)
            assert mod.num_heads == job.info.heads_of(t)
            W, F = job.weight(layer, t), fisher[(layer, t)]
            for h, r in enumerate(no_ft.layers[layer].factors[t].ranks):
                if r >= d:
                    continue
                rows = slice(h * d, (h + 1) * d)
                f0 = no_ft.layers[layer].factors[t]
                den = (F[rows] * W[rows] ** 2).sum()
                before.append(float((F[rows] * (W[rows] - f0.A[h] @ f0.B[h]) ** 2).sum() / den))
                tuned = (mod.head_up(h) @ mod.head_down(h)).detach()
                after.append(float((F[rows] * (W[rows] - tuned) ** 2).sum() / den))
                heads += 1
    ft = plan.report["finetune"]
    assert heads == ft["heads_tuned"] > 0
    # The report's losses are those of the factors the model runs, from a Fisher of the model's own loss.
    assert sum(before) / heads == pytest.approx(ft["mean_loss_before"], rel=1e-5)
    assert sum(after) / heads == pytest.approx(ft["mean_loss_after"], rel=1e-5)
    assert ft["mean_loss_after"] < 0.9 * ft["mean_loss_before"]
