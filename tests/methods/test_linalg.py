"""Whitening factors, ASVD scaling and spectra: the identities the decomposers rely on."""

import pytest
import torch
from method_helpers import rel

from lowrank_kit.errors import CalibrationError
from lowrank_kit.methods.linalg import activation_scaling, identity_transform, spectrum, thin_svd, whitening

# fp64 factorizations of 24×24 matrices: identities hold to ~1e-12; 1e-9 leaves room for conditioning.
TIGHT = 1e-9
# Spectra are stored in fp32: products of stored factors agree to fp32 rounding times conditioning.
FP32 = 1e-5


def _gram(tokens: int, n: int = 24, seed: int = 0) -> torch.Tensor:
    X = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    X[:, 0] *= 30.0  # an outlier channel, as real activations have
    return X.T @ X / tokens


@pytest.mark.parametrize("route", ["eigen", "cholesky"])
def test_whitening_factor_squares_to_a_full_rank_gram(route):
    G = _gram(200)
    t = whitening(G, route)
    assert rel(t.S @ t.S.T, G) < TIGHT
    assert rel(t.S @ t.S_inv, torch.eye(24, dtype=torch.float64)) < TIGHT
    assert t.clamped == 0 and t.jitter == 0.0


def test_eigen_route_floors_a_rank_deficient_gram_without_nan():
    G = _gram(5)  # 5 tokens, 24 channels: rank 5
    t = whitening(G, "eigen", eps=1e-6)
    assert torch.isfinite(t.S).all() and torch.isfinite(t.S_inv).all()
    assert t.clamped == 24 - 5
    assert rel(t.S @ t.S_inv, torch.eye(24, dtype=torch.float64)) < 1e-6  # condition number ~1e3
    # On the data's own span the factor is exact: the floor only touches the null space.
    evecs = torch.linalg.eigh(G).eigenvectors
    span = evecs[:, -5:]
    assert rel(span.T @ (t.S @ t.S.T) @ span, span.T @ G @ span) < TIGHT


def test_cholesky_route_adds_jitter_to_a_singular_gram():
    G = _gram(5)
    t = whitening(G, "cholesky", eps=1e-6)
    assert t.jitter > 0.0
    assert torch.isfinite(t.S_inv).all()
    assert rel(t.S @ t.S_inv, torch.eye(24, dtype=torch.float64)) < 1e-6


def test_whitening_errors():
    with pytest.raises(CalibrationError, match="unknown whitening route 'qr'; available: eigen, cholesky"):
        whitening(_gram(50), "qr")
    with pytest.raises(CalibrationError, match="Gram matrix of layer 3 is zero"):
        whitening(torch.zeros(4, 4), where=" of layer 3")
    bad = _gram(50)
    bad[1, 1] = float("nan")
    with pytest.raises(CalibrationError, match="non-finite"):
        whitening(bad)


def test_whitened_truncation_is_optimal_in_output_space():
    """‖(W − AB)S‖² equals the tail of W S's spectrum, and beats plain SVD on the calibration inputs."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(300, 24, generator=gen, dtype=torch.float64) * torch.logspace(
        0, 2, 24, dtype=torch.float64
    )
    W = torch.randn(16, 24, generator=gen, dtype=torch.float64)
    t = whitening(X.T @ X / 300)
    spec = spectrum(W[None], t)
    r = 6
    f = spec.factors(0, r, beta=0.5)
    err_white = ((W - f.A.double() @ f.B.double()) @ t.S).norm() ** 2
    tail = (spec.sigma[0, r:].double() ** 2).sum()
    assert float(err_white / tail) == pytest.approx(1.0, abs=1e-5)
    plain = spectrum(W[None], identity_transform(24, "cpu")).factors(0, r, beta=0.5)
    out_white = ((W - f.A.double() @ f.B.double()) @ X.T).norm()
    out_plain = ((W - plain.A.double() @ plain.B.double()) @ X.T).norm()
    assert out_white < out_plain


def test_spectrum_factors_keep_any_index_set_with_the_sigma_split():
    G = _gram(100)
    W = torch.randn(3, 8, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = whitening(G)
    spec = spectrum(W, t)
    assert spec.groups == 3 and spec.full_rank == 8
    idx = torch.tensor([0, 2, 5])
    for beta in (0.0, 0.5, 1.0):
        f = spec.factors(1, idx, beta)
        U, s, Vh = torch.linalg.svd(t.apply(W[1]), full_matrices=False)
        expected = (U[:, idx] * s[idx]) @ Vh[idx] @ t.S_inv
        assert rel(f.A.double() @ f.B.double(), expected) < FP32
        # β sets how Σ is split: A's column norms are σ^(1−β) (U has unit columns).
        assert torch.allclose(f.A.double().norm(dim=0), s[idx] ** (1 - beta), rtol=1e-5)
    full = spec.factors(2, 8, 0.5)
    assert rel(full.A.double() @ full.B.double(), W[2]) < FP32


def test_activation_scaling_floors_dead_channels_and_rejects_all_zero():
    s = torch.tensor([4.0, 0.0, 1.0])
    t = activation_scaling(s, alpha=0.5, eps=1e-6)
    assert t.clamped == 1 and torch.isfinite(t.S_inv).all()
    assert torch.allclose(t.S, torch.tensor([2.0, (4e-6) ** 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(t.S * t.S_inv, torch.ones(3, dtype=torch.float64))
    with pytest.raises(CalibrationError, match="every calibration activation of this layer is zero"):
        activation_scaling(torch.zeros(3), alpha=0.5)


@pytest.mark.parametrize("shape", [(3, 6, 40), (2, 40, 6), (2, 12, 16)])
def test_thin_svd_matches_the_direct_svd_on_wide_tall_and_square_batches(shape):
    M = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    M[0, :, 1] = M[0, :, 0]  # a repeated column: rank deficiency must not break the QR route
    U, s, Vh = thin_svd(M)
    k = min(shape[1:])
    assert U.shape == (shape[0], shape[1], k) and Vh.shape == (shape[0], k, shape[2])
    assert torch.allclose(s, torch.linalg.svdvals(M), atol=1e-12)
    assert torch.allclose(U @ torch.diag_embed(s) @ Vh, M, atol=1e-12)
    eye = torch.eye(k, dtype=torch.float64).expand(shape[0], k, k)
    assert torch.allclose(U.mT @ U, eye, atol=1e-12) and torch.allclose(Vh @ Vh.mT, eye, atol=1e-12)
