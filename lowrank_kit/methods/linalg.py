"""Linear algebra shared by the decomposers: input transforms (whitening, ASVD scaling) and spectra.

An *input transform* is a matrix ``S`` (n×n) with a known inverse such that the error that matters for
a projection ``W`` (m×n) is ``‖(W − W')S‖_F``: the whitening factor of the layer input's Gram matrix
(``S Sᵀ = G``, SVD-LLM) or ASVD's diagonal ``diag(s^α)``. A *spectrum* is the SVD of ``W S`` for one
group of rows (a head, a whole matrix, or the stacked Q/K/V of QSVD), kept in the form the decomposers
and the importance scores need: ``W S = U Σ Vᵀ`` stored as ``U``, ``Σ`` and ``Vᵀ S⁻¹`` (the rows of the
down-projection before the Σ split). Truncating the spectrum to any index set gives the factors
``A = U Σ^{1−β}``, ``B = Σ^β Vᵀ S⁻¹`` directly.

Factorizations run in fp64 (METHODS.md §1); results are stored in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowrank_kit.errors import CalibrationError
from lowrank_kit.modules import DenseFactors

WHITENING_ROUTES = ("eigen", "cholesky")


@dataclass
class InputTransform:
    """``S`` and ``S⁻¹`` for one layer input; a 1-D ``S`` stands for ``diag(S)`` (ASVD scaling)."""

    S: torch.Tensor
    S_inv: torch.Tensor
    route: str
    # Eigenvalues of the Gram matrix raised to the floor (eigen route), or the jitter added to its
    # diagonal (Cholesky route): how much the factor differs from an exact square root of G.
    clamped: int = 0
    jitter: float = 0.0

    @property
    def diagonal(self) -> bool:
        return self.S.dim() == 1

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        """``W S`` for ``W`` of shape (..., n)."""
        S = self.S.to(W.dtype)
        return W * S if self.diagonal else W @ S

    def apply_inverse(self, X: torch.Tensor) -> torch.Tensor:
        """``X S⁻¹`` for ``X`` of shape (..., n)."""
        S_inv = self.S_inv.to(X.dtype)
        return X * S_inv if self.diagonal else X @ S_inv

    def info(self) -> dict:
        return {"route": self.route, "clamped_eigenvalues": self.clamped, "jitter": self.jitter}


def _symmetric(G: torch.Tensor) -> torch.Tensor:
    G = G.to(torch.float64)
    return 0.5 * (G + G.T)


def whitening(gram: torch.Tensor, route: str = "eigen", eps: float = 1e-6, where: str = "") -> InputTransform:
    """A factor ``S`` with ``S Sᵀ ≈ G`` and its inverse, in fp64.

    ``eigen`` (SVD-LLM V2): ``G = Q Λ Qᵀ``, ``S = Q Λ^{1/2}``. Eigenvalues below ``eps·λ_max`` are raised
    to that floor: a rank-deficient Gram matrix (fewer calibration tokens than channels) says nothing
    about its null space, and the floor keeps ``S`` invertible there so a full-rank truncation is still
    exact, while directions the calibration data does see keep their relative weights.
    ``cholesky`` (SVD-LLM): ``G = L Lᵀ``; when that fails, ``(−λ_min + eps·λ_max)·I`` is added and the
    factorization retried once; a second failure is an error, never a silent fallback.
    """
    if route not in WHITENING_ROUTES:
        raise CalibrationError(f"unknown whitening route {route!r}; available: {', '.join(WHITENING_ROUTES)}")
    G = _symmetric(gram)
    if not torch.isfinite(G).all():
        raise CalibrationError(f"the Gram matrix{where} has non-finite entries; check the calibration inputs")
    if not float(G.diagonal().max()) > 0.0:
        raise CalibrationError(
            f"the Gram matrix{where} is zero: every calibration input to this layer is zero; "
            "check that the calibration samples reach the language model"
        )
    if route == "eigen":
        evals, evecs = torch.linalg.eigh(G)
        floor = eps * float(evals[-1])
        clamped = int((evals < floor).sum())
        root = evals.clamp_min(floor).sqrt()
        return InputTransform(evecs * root, evecs.T / root[:, None], route, clamped=clamped)
    jitter = 0.0
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        evals = torch.linalg.eigvalsh(G)
        jitter = -float(evals[0]) + eps * float(evals[-1])
        L, info = torch.linalg.cholesky_ex(G + jitter * eye)
        if int(info) != 0:
            raise CalibrationError(
                f"Cholesky factorization of the Gram matrix{where} failed even with jitter {jitter:.3g}; "
                "use whitening: eigen"
            )
    S_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    return InputTransform(L, S_inv, route, jitter=jitter)


def activation_scaling(abs_mean: torch.Tensor, alpha: float, eps: float = 1e-6) -> InputTransform:
    """ASVD's ``S = diag(s^α)`` from the per-channel mean absolute activation ``s``.

    Channels whose mean is below ``eps·max(s)`` (never active on the calibration data) take that floor so
    ``S`` stays invertible.
    """
    s = abs_mean.to(torch.float64)
    top = float(s.max()) if s.numel() else 0.0
    if not top > 0.0:
        raise CalibrationError(
            "every calibration activation of this layer is zero; check that the calibration samples reach "
            "the language model"
        )
    floor = eps * top
    clamped = int((s < floor).sum())
    scale = s.clamp_min(floor).pow(alpha)
    return InputTransform(scale, 1.0 / scale, "activation", clamped=clamped)


def identity_transform(n: int, device: torch.device | str = "cpu") -> InputTransform:
    one = torch.ones(n, dtype=torch.float64, device=device)
    return InputTransform(one, one, "identity")


@dataclass
class Spectrum:
    """SVD of ``W S`` for ``groups`` row blocks at once (heads, or one block for a whole matrix).

    ``U``: (groups, rows, k); ``sigma``: (groups, k), descending per group; ``down``: (groups, k, n) with
    rows ``v_iᵀ S⁻¹``. fp32.
    """

    U: torch.Tensor
    sigma: torch.Tensor
    down: torch.Tensor

    @property
    def groups(self) -> int:
        return self.U.shape[0]

    @property
    def full_rank(self) -> int:
        return self.sigma.shape[1]

    def factors(self, group: int, keep: torch.Tensor | int, beta: float) -> DenseFactors:
        """Factors of group ``group`` keeping the components ``keep`` (an index tensor or a leading count)."""
        idx = torch.arange(int(keep), device=self.sigma.device) if isinstance(keep, int) else keep
        idx = idx.to(self.sigma.device)
        s = self.sigma[group, idx].to(torch.float64)
        A = self.U[group][:, idx].to(torch.float64) * s.pow(1.0 - beta)
        B = s.pow(beta)[:, None] * self.down[group][idx].to(torch.float64)
        return DenseFactors(A.float(), B.float())


def thin_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD of a batch of matrices; a QR step first when they are far from square.

    A head's whitened weight is d×n with n ≫ d (128×4096 in a 7B model). ``M = Rᵀ Qᵀ`` from the QR of
    ``Mᵀ`` leaves only a small square SVD of ``Rᵀ``; QR is backward stable, so this loses nothing to
    the direct route, and GPU solvers handle many small square problems far faster than wide ones.
    """
    m, n = M.shape[-2:]
    if n >= 2 * m:
        Q, R = torch.linalg.qr(M.mT)
        U, sigma, Vh_r = torch.linalg.svd(R.mT)
        return U, sigma, Vh_r @ Q.mT
    if m >= 2 * n:
        Q, R = torch.linalg.qr(M)
        U_r, sigma, Vh = torch.linalg.svd(R)
        return Q @ U_r, sigma, Vh
    return torch.linalg.svd(M, full_matrices=False)


def spectrum(W: torch.Tensor, transform: InputTransform) -> Spectrum:
    """Spectrum of ``W`` (groups, rows, n) under ``transform``, computed in fp64."""
    Wd = W.to(torch.float64)
    U, sigma, Vh = thin_svd(transform.apply(Wd))
    if not (torch.isfinite(sigma).all() and torch.isfinite(U).all()):
        raise CalibrationError("the SVD of a transformed weight returned non-finite values")
    down = transform.apply_inverse(Vh)
    return Spectrum(U.float(), sigma.float(), down.float())
