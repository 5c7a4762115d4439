"""Local QAT: the Cayley step stays on the orthogonal group, QAT lowers the quantized-factor error,
and the rotation is folded into the factors."""

import pytest
import torch
from quant_helpers import decompose, quantize, samples, tiny

import lowrank_kit
from lowrank_kit.errors import CalibrationError, LowRankError
from lowrank_kit.quant.qat import QATConfig, UnitBatch, _ste_rows, cayley_step, train_units
from lowrank_kit.recipe import parse_recipe


def _qat_loss(R, A, B, W, F, bits=4):
    E = W - _ste_rows(A @ R.transpose(1, 2), bits) @ _ste_rows(R @ B, bits)
    return (F * E * E).sum() / (F * W * W).sum()


@pytest.mark.parametrize("r", [4, 16, 64])
def test_cayley_steps_stay_orthogonal_over_1000_steps(r):
    gen = torch.Generator().manual_seed(r)
    A = torch.randn(6, 32, r, generator=gen, dtype=torch.float64)
    B = torch.randn(6, r, 48, generator=gen, dtype=torch.float64)
    W, F = A @ B, torch.rand(6, 32, 48, generator=gen, dtype=torch.float64)
    R = torch.eye(r, dtype=torch.float64).expand(6, r, r).clone()
    eye = torch.eye(r, dtype=torch.float64)
    start = float(_qat_loss(R, A, B, W, F))
    worst = 0.0
    for _ in range(1000):
        Rg = R.clone().requires_grad_(True)
        _qat_loss(Rg, A, B, W, F).backward()
        R, _ = cayley_step(R, Rg.grad, lr=1.0, iters=5)
        worst = max(worst, float((R @ R.transpose(1, 2) - eye).abs().max()))
    assert worst < 1e-5
    assert float(_qat_loss(R, A, B, W, F)) < start  # the steps descend


def test_cayley_step_is_a_rotation_along_the_projected_gradient():
    gen = torch.Generator().manual_seed(0)
    X = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))[0]
    G = 1e-3 * torch.randn(8, 8, generator=gen, dtype=torch.float64)
    Y, _ = cayley_step(X, G, lr=1.0)
    assert torch.allclose(Y @ Y.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    # First order: Y − X ≈ −(G − X Gᵀ X)/2, the gradient projected onto the tangent space.
    step = -(G - X @ G.T @ X) / 2
    assert torch.allclose(Y - X, step, atol=1e-5)
    # Step size: α = min(lr, 1/‖W‖₁) caps a large gradient's step.
    Y_big, _ = cayley_step(X, 1e3 * G, lr=1.0)
    assert (Y_big - X).abs().max() < 2.0


def test_train_units_returns_the_same_products_with_less_rounding_error():
    gen = torch.Generator().manual_seed(3)
    N, m, r, n = 3, 16, 6, 24
    A, B = torch.randn(N, m, r, generator=gen), torch.randn(N, r, n, generator=gen)
    ranks = [6, 4, 5]
    for i, k in enumerate(ranks):
        A[i, :, k:] = 0
        B[i, k:] = 0
    W = A @ B
    batch = UnitBatch(A, B, W, torch.rand(N, m, n, generator=gen), torch.full((N, m), 1e-3), ranks)
    A2, B2, start, end = train_units(batch, 4, QATConfig())
    assert (end <= start).all() and (end < start).any()
    for i, k in enumerate(ranks):  # padding stays empty: no unit grows past its rank
        assert not A2[i, :, k:].any() and not B2[i, k:].any()
    # A, B move by at most 50 Adam steps of 1e-5; R is orthogonal, so the product barely changes.
    assert ((A2 @ B2 - W).norm() / W.norm()) < 1e-3


@pytest.mark.parametrize("method", ["wsvd", "svd", "qsvd"])
def test_qat_on_a_decomposed_model(method):
    model = tiny("llava")
    decompose(model, "llava", method)
    attn = model.model.language_model.layers[1].self_attn
    kinds = {t: type(getattr(attn, t)) for t in ("q_proj", "k_proj", "v_proj")}
    before = {t: getattr(attn, t).weight.detach().clone() for t in kinds}
    latent_before = attn.k_proj.latent(torch.ones(1, 64)).detach()
    result = quantize(model, "llava", "w4a16", methods=["qat"])
    report = result.report["quantize"]["qat"]
    expected_units = {"wsvd": 2 * (4 + 2 + 2), "svd": 2 * 3, "qsvd": 2}[method]
    assert report["units_trained"] == expected_units
    assert report["mean_loss_after"] < report["mean_loss_before"]
    # The dense stand-ins of the Fisher pass are gone again and the weights A B barely moved: Adam moves
    # an element by about lr per step, 50 · 1e-5 = 5e-4, against factor entries of ~0.05 here ...
    assert {t: type(getattr(attn, t)) for t in kinds} == kinds
    for t, w in before.items():
        assert ((getattr(attn, t).weight - w).norm() / w.norm()) < 2e-2
    # ... while the factors themselves are rotated (the latent basis changed).
    assert not torch.allclose(attn.k_proj.latent(torch.ones(1, 64)), latent_before, atol=1e-4)


def test_qat_scheme_runs_before_rtn_and_reuses_the_cache(tmp_path):
    def run():
        model = tiny("llava")
        recipe = parse_recipe(
            {
                "model": "llava",
                "steps": [
                    {"type": "decompose", "method": "wsvd", "ratio": 0.6},
                    {"type": "quantize", "scheme": "w8a8-qat"},
                ],
            }
        )
        return lowrank_kit.compress(model, recipe, calibration=samples(model), cache_dir=tmp_path)

    first = run()
    assert first.report["quantize"]["methods"] == ["hadamard", "qat", "rtn"]
    second = run()
    reused = second.report["calibration_cache"]["reused"]
    assert any(name.startswith("qat-gradient_stats") for name in reused), reused
    assert any(name.startswith("qat-qat_layer") for name in reused), reused
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_qat_needs_a_decomposed_model():
    model = tiny("llava")
    with pytest.raises(
        LowRankError, match="qat rotates the rank dimension of low-rank factors, and this model has none"
    ):
        quantize(model, "llava", "w8a8", methods=["qat"])


def test_qat_needs_calibration():
    model = tiny("llava")
    decompose(model, "llava", "svd")
    recipe = parse_recipe({"model": "llava", "steps": [{"type": "quantize", "scheme": "w8a8-qat"}]})
    with pytest.raises(CalibrationError, match="this recipe needs calibration data"):
        lowrank_kit.compress(model, recipe)  # no samples and no processor to build them


def test_qat_after_rounding_is_an_error():
    model = tiny("llava")
    decompose(model, "llava", "svd")
    quantize(model, "llava", "w8a16")
    with pytest.raises(LowRankError, match="qat: the model is already quantized"):
        quantize(model, "llava", "w8a16", methods=["qat"])


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"steps": 0}, r"params.qat.steps: Input should be greater than or equal to 1"),
        ({"cayley_lr": -1}, r"params.qat.cayley_lr: Input should be greater than 0"),
        ({"lr_typo": 1}, r"params.qat.lr_typo: unknown field"),
    ],
)
def test_qat_parameter_errors(params, match):
    from lowrank_kit.errors import RecipeError
    from lowrank_kit.recipe import resolve_recipe

    recipe = parse_recipe(
        {"model": "llava", "steps": [{"type": "quantize", "scheme": "w8a8-qat", "params": {"qat": params}}]}
    )
    with pytest.raises(RecipeError, match=match):
        resolve_recipe(recipe)
