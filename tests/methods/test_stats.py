"""The calibration-statistics engine against independent computations on tiny models."""

import copy

import pytest
import torch
from method_helpers import FAMILIES, TARGETS, make_job, make_samples, projection_inputs, rel
from safetensors.torch import load_file, save_file

from lowrank_kit.data.calibration import CalibrationSample
from lowrank_kit.errors import CalibrationError
from lowrank_kit.methods import stats as stats_mod
from lowrank_kit.methods.linalg import spectrum, whitening
from lowrank_kit.methods.stats import (
    GradientStats,
    ImportanceBasis,
    InputStats,
    StageRecorder,
    answer_loss,
    calibration_loss,
    collect_gradient_stats,
    collect_input_stats,
    require_calibration,
)
from lowrank_kit.models.tiny import build_tiny_model, tiny_inputs

# Sums of a few hundred fp32 products in a different order: agreement to ~1e-6 relative.
FP32_SUMS = 1e-5


def _recorder(job):
    return StageRecorder(job.reporter, job.device)


def test_answer_loss_is_teacher_forced_like_the_models_own_loss():
    model = build_tiny_model("llava")
    sample = make_samples(model, n=1, answer_tokens=4)[0]
    with torch.no_grad():
        out = model(**sample.inputs, labels=sample.labels)
    assert float(answer_loss(out.logits, sample.labels)) == pytest.approx(float(out.loss), rel=1e-6)


def test_answer_loss_reads_the_prediction_one_position_earlier():
    labels = torch.tensor([[-100, -100, 7, 9]])
    logits = torch.full((1, 4, 12), -20.0)
    logits[0, 1, 7] = 20.0  # position 1 predicts the token at position 2
    logits[0, 2, 9] = 20.0
    assert float(answer_loss(logits, labels)) < 1e-6
    misaligned = torch.full((1, 4, 12), -20.0)
    misaligned[0, 2, 7] = 20.0  # the released WSVD code's alignment: label and logit at the same position
    misaligned[0, 3, 9] = 20.0
    assert float(answer_loss(misaligned, labels)) > 10.0


def test_a_sample_without_answer_tokens_is_an_error():
    labels = torch.full((1, 5), -100)
    labels[0, 0] = 3  # position 0 has no predecessor, so nothing is left after the shift
    with pytest.raises(CalibrationError, match="no answer tokens"):
        answer_loss(torch.zeros(1, 5, 8), labels)


def test_missing_calibration_is_an_error():
    model = build_tiny_model("llava")
    with pytest.raises(CalibrationError, match="method 'wsvd' needs calibration samples, got none"):
        require_calibration(make_job(model, samples=None), "wsvd")
    with pytest.raises(CalibrationError, match="no calibration samples"):
        collect_input_stats(make_job(model, samples=[]), StageRecorder(make_job(model).reporter, "cpu"))


@pytest.mark.parametrize("family", FAMILIES)
def test_input_stats_match_the_inputs_each_projection_sees(family):
    """One hook per layer is enough only if q, k and v see the same input: checked per family."""
    model = build_tiny_model(family)
    samples = make_samples(model, n=2)
    job = make_job(model, samples=samples)
    stats = collect_input_stats(job, _recorder(job))
    seen = {(layer, t): projection_inputs(job, samples, layer, t) for layer in job.layers for t in TARGETS}
    for layer in job.layers:
        X = seen[(layer, "q_proj")]
        for t in ("k_proj", "v_proj"):
            assert torch.equal(seen[(layer, t)], X)
        assert stats.tokens == X.shape[0]
        assert rel(stats.gram[layer], X.T @ X / X.shape[0]) < FP32_SUMS
        assert rel(stats.abs_mean[layer], X.abs().mean(0)) < FP32_SUMS


def test_statistics_round_trip_through_safetensors(tmp_path):
    model = build_tiny_model("llava")
    job = make_job(model, samples=make_samples(model, n=1))
    stats = collect_input_stats(job, _recorder(job))
    save_file(stats.state_dict(), tmp_path / "stats.safetensors")
    back = InputStats.from_state_dict(load_file(tmp_path / "stats.safetensors"))
    assert back.tokens == stats.tokens
    assert all(torch.equal(back.gram[i], stats.gram[i]) for i in stats.gram)
    assert all(torch.equal(back.abs_mean[i], stats.abs_mean[i]) for i in stats.abs_mean)
    W = job.weight(0, "k_proj").view(job.info.num_kv_heads, job.info.head_dim, -1)
    basis = ImportanceBasis(spectrum(W, whitening(stats.gram[0])), ("k_proj",))
    grads = collect_gradient_stats(job, _recorder(job), bases={(0, "k_proj"): basis})
    save_file(grads.state_dict(), tmp_path / "grads.safetensors")
    again = GradientStats.from_state_dict(load_file(tmp_path / "grads.safetensors"))
    assert (again.samples, again.mean_loss) == (grads.samples, pytest.approx(grads.mean_loss))
    assert set(again.fisher) == set(grads.fisher) and set(again.importance) == {(0, "k_proj")}
    assert all(torch.equal(again.fisher[k], grads.fisher[k]) for k in grads.fisher)
    assert torch.equal(again.importance[(0, "k_proj")], grads.importance[(0, "k_proj")])


def _reference_grads(model, samples, layer, target):
    ref = copy.deepcopy(model)
    grads = []
    for s in samples:
        ref.zero_grad()
        ref(**s.inputs, labels=s.labels).loss.backward()
        grads.append(job_weight(ref, layer, target).grad.detach().clone())
    return grads


def job_weight(model, layer, target):
    return make_job(model).projection(layer, target).weight


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fisher_and_importance_match_per_sample_autograd(family):
    model = build_tiny_model(family)
    samples = make_samples(model, n=3)
    job = make_job(model, samples=samples)
    stats = collect_input_stats(job, _recorder(job), abs_mean=False)
    W = job.weight(1, "k_proj").view(job.info.num_kv_heads, job.info.head_dim, -1)
    spec = spectrum(W, whitening(stats.gram[1]))
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = collect_gradient_stats(
        job, _recorder(job), bases={(1, "k_proj"): ImportanceBasis(spec, ("k_proj",))}
    )
    ref = _reference_grads(model, samples, 1, "k_proj")
    fisher_ref = torch.stack([g * g for g in ref]).mean(0)
    assert grads.fisher[(1, "k_proj")].dtype == torch.float32
    assert rel(grads.fisher[(1, "k_proj")], fisher_ref) < FP32_SUMS
    assert set(grads.fisher) == {(layer, t) for layer in job.layers for t in TARGETS}
    # I_i = σ_i sqrt(mean_n (u_iᵀ G_n S^{-ᵀ} v_i)²), one head and one index at a time.
    d = job.info.head_dim
    for h in range(job.info.num_kv_heads):
        for i in (0, 3, d - 1):
            u, down = spec.U[h][:, i].double(), spec.down[h][i].double()
            g = torch.stack([u @ G[h * d : (h + 1) * d].double() @ down for G in ref])
            expected = spec.sigma[h, i].double() * g.pow(2).mean().sqrt()
            assert float(grads.importance[(1, "k_proj")][h, i]) == pytest.approx(float(expected), rel=1e-4)
    assert all(torch.equal(p, weights_before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before


def test_importance_projection_is_the_derivative_along_a_singular_direction():
    """u_iᵀ G S^{-ᵀ} v_i = dL/dσ_i: checked by central differences on an fp64 model."""
    model = build_tiny_model("llava", dtype=torch.float64)
    samples = make_samples(model, n=1)
    job = make_job(model, samples=samples)
    stats = collect_input_stats(job, _recorder(job), abs_mean=False)
    layer, target, head, i = 0, "v_proj", 1, 2
    W = job.projection(layer, target).weight.detach().double()
    d = job.info.head_dim
    spec = spectrum(W.view(-1, d, W.shape[-1]), whitening(stats.gram[layer].double()))
    grads = collect_gradient_stats(
        job, _recorder(job), fisher=False, bases={(layer, target): ImportanceBasis(spec, (target,))}
    )
    direction = torch.zeros_like(W)
    direction[head * d : (head + 1) * d] = torch.outer(
        spec.U[head][:, i].double(), spec.down[head][i].double()
    )
    # transformers computes RoPE tables in fp32 even in an fp64 model, so losses carry ~1e-9 noise: a
    # step of 1e-2 keeps that noise far below the difference while the curvature error stays ~1e-4.
    delta = 1e-2
    plus = calibration_loss(job, samples, {(layer, target): W + delta * direction})
    minus = calibration_loss(job, samples, {(layer, target): W - delta * direction})
    derivative = (plus - minus) / (2 * delta)
    score = float(grads.importance[(layer, target)][head, i] / spec.sigma[head, i])
    # fp32-stored spectrum and gradients plus the central difference's error: 1e-3 relative.
    assert score == pytest.approx(abs(derivative), rel=1e-3)


def test_calibration_loss_with_a_replacement_equals_the_replaced_model_and_leaves_it_alone():
    model = build_tiny_model("qwen2_vl")  # q/k/v carry biases, which the replacement must keep
    samples = make_samples(model, n=2)
    job = make_job(model, samples=samples)
    W = job.weight(0, "q_proj") * 0.5
    replaced = calibration_loss(job, samples, {(0, "q_proj"): W})
    original = calibration_loss(job, samples)
    other = copy.deepcopy(model)
    with torch.no_grad():
        make_job(other).projection(0, "q_proj").weight.copy_(W)
        expected = sum(float(other(**s.inputs, labels=s.labels).loss) for s in samples) / 2
    assert replaced == pytest.approx(expected, rel=1e-5)
    assert calibration_loss(job, samples) == original  # hooks removed


def test_fp16_gradients_are_loss_scaled_and_back_off_on_overflow(monkeypatch):
    model32 = build_tiny_model("llava")
    model16 = build_tiny_model("llava", dtype=torch.float16)
    samples = make_samples(model32, n=1)
    ref = collect_gradient_stats(
        make_job(model32, samples=samples), StageRecorder(make_job(model32).reporter, "cpu")
    )
    # A scale far beyond fp16's range forces overflow; the engine must halve it until gradients are finite.
    monkeypatch.setattr(stats_mod, "FP16_LOSS_SCALE", 2.0**40)
    job16 = make_job(model16, samples=samples)
    got = collect_gradient_stats(job16, _recorder(job16))
    for key, f in ref.fisher.items():
        assert torch.isfinite(got.fisher[key]).all()
        # fp16 forward and backward: ~1e-2 relative on squared gradients.
        assert rel(got.fisher[key], f) < 5e-2


def test_stage_recorder_records_time_and_memory():
    rec = StageRecorder(make_job(build_tiny_model("llava")).reporter, "cpu")
    with rec.stage("one", total=2) as st:
        st.advance(2)
    report = rec.report()
    assert [s["stage"] for s in report["stages"]] == ["one"]
    assert report["stages"][0]["seconds"] >= 0.0 and report["stages"][0]["peak_rss_bytes"] > 0


def test_padded_sample_that_does_not_fit_the_hooked_shape_is_an_error():
    model = build_tiny_model("llava")
    inputs = tiny_inputs(model)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]
    inputs["attention_mask"] = torch.cat([torch.zeros(1, 1, dtype=torch.long), inputs["attention_mask"]], 1)
    job = make_job(model, samples=[CalibrationSample(inputs, labels)])
    with pytest.raises(Exception, match="attention_mask"):
        collect_input_stats(job, _recorder(job))
