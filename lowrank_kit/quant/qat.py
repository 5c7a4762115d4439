"""``qat``: WSVD's local quantization-aware training of the low-rank factors (§3.3 of the paper).

For every low-rank unit (a head of a per-head projection, a whole ``LowRankLinear``, or a shared latent
with the up-projections that read it) an orthogonal ``R`` of the rank dimension is learned together
with the factors, to minimize the Fisher-weighted error of the *quantized* factors:

    L = Σ_t ‖F_t^{1/2} ⊙ (W_t − Q(A_t Rᵀ) Q(R B))‖² / ‖F_t^{1/2} ⊙ W_t‖²

``Q`` is the per-output-channel symmetric rounding the ``rtn`` step applies afterwards (max scaling,
straight-through gradients), with the scheme's weight bits. Since ``(A Rᵀ)(R B) = A B``, R changes only
how well the factors survive rounding. A and B are fp32 masters trained by Adam (lr 1e-5, 50 steps);
R by Cayley SGD on the orthogonal group (:func:`cayley_step`, lr 1.0, five fixed-point iterations).
Each unit keeps the best iterate it reached, so QAT never ends worse than plain rounding of the
factors it started from. At the end R is folded into the factors: ``A ← A Rᵀ``, ``B ← R B``.

The reference ``W_t`` is the model's weight when the step runs, i.e. the decomposer's ``A B`` in
whatever basis earlier steps left it (after ``hadamard``: the rotated basis). The Fisher ``F`` is the
element-wise Fisher of the answer loss with respect to that same weight, measured by the calibration-
statistics engine on the model as it is (each low-rank projection temporarily replaced by a dense
linear of its weight), so it is in the same basis as the error: a Fisher computed before a rotation
would not transform element-wise, which the released code ignored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lowrank_kit.calib_cache import cached
from lowrank_kit.errors import CalibrationError, LowRankError
from lowrank_kit.methods.base import DecomposeJob, MethodConfig, QuantizeJob, Quantizer
from lowrank_kit.methods.stats import StageRecorder, collect_gradient_stats
from lowrank_kit.models.base import TARGETS
from lowrank_kit.modules import JointLowRankProjection, LowRankLinear, PerHeadLowRankLinear
from lowrank_kit.quant.primitives import qmax
from lowrank_kit.quant.structure import check_not_quantized


class QATConfig(MethodConfig):
    steps: int = Field(50, ge=1, description="optimization steps per unit")
    lr: float = Field(1e-5, gt=0.0, description="Adam learning rate of the factors A, B")
    cayley_lr: float = Field(1.0, gt=0.0, description="Cayley SGD learning rate of the rotations R")
    cayley_iters: int = Field(5, ge=1, description="fixed-point iterations of each Cayley step")
    cayley_momentum: float = Field(0.0, ge=0.0, lt=1.0, description="momentum of Cayley SGD")


# -- the Cayley step ---------------------------------------------------------------------------------
def cayley_step(
    X: torch.Tensor,
    G: torch.Tensor,
    lr: float,
    iters: int = 5,
    buf: torch.Tensor | None = None,
    momentum: float = 0.0,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cayley SGD step on the orthogonal group for a batch ``X`` [..., r, r] with gradient ``G``.

    The descent direction ``M = momentum · buf − G`` gives ``Ŵ = M Xᵀ − ½ X (Xᵀ M Xᵀ)`` and the skew
    ``W = Ŵ − Ŵᵀ``; the step size is ``α = min(lr, 1/‖W‖₁)`` per matrix (``‖·‖₁`` the maximum absolute
    column sum); the Cayley curve ``Y = X + α W (X + Y) / 2`` is solved by ``iters`` fixed-point
    iterations from ``Y = X + α W X``. Returns the new X and the momentum buffer.
    """
    M = -G if buf is None else momentum * buf - G
    Xt = X.transpose(-1, -2)
    W_hat = M @ Xt - 0.5 * X @ (Xt @ M @ Xt)
    W = W_hat - W_hat.transpose(-1, -2)
    norm1 = W.abs().sum(-2).amax(-1)  # max column sum
    alpha = torch.minimum(torch.full_like(norm1, lr), 1.0 / (norm1 + eps))[..., None, None]
    Y = X + alpha * (W @ X)
    for _ in range(iters):
        Y = X + (0.5 * alpha) * (W @ (X + Y))
    return Y, M


def _ste_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row symmetric rounding with max scaling; gradients pass straight through the rounding."""
    m = qmax(bits)
    scale = x.abs().amax(-1, keepdim=True) / m
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = x / scale
    y = y + (torch.round(y).clamp(-m, m) - y).detach()
    return y * scale


@dataclass
class UnitBatch:
    """Padded units of one layer: unit i has rank ``ranks[i]`` and ``rows[i]`` output rows."""

    A: torch.Tensor  # [N, m, r]
    B: torch.Tensor  # [N, r, n]
    W: torch.Tensor  # [N, m, n]
    F: torch.Tensor  # [N, m, n]
    row_weight: torch.Tensor  # [N, m]: 1/‖F^½ ⊙ W‖² of the row's target, 0 on padding
    ranks: list[int] = field(default_factory=list)


def train_units(
    batch: UnitBatch, bits: int, cfg: QATConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local QAT of a batch. Returns the folded factors ``A Rᵀ``, ``R B`` (best iterate per unit) and the
    per-unit losses at the start (rounding alone) and at the returned factors."""
    N, _, r = batch.A.shape
    device = batch.A.device
    rmask = torch.zeros(N, r, device=device)
    for i, k in enumerate(batch.ranks):
        rmask[i, :k] = 1.0
    block = rmask[:, :, None] * rmask[:, None, :]  # each unit's R lives in its own r_i × r_i block
    pad_eye = torch.diag_embed(1.0 - rmask).double()
    A = nn.Parameter(batch.A.clone())
    B = nn.Parameter(batch.B.clone())
    R = torch.eye(r, device=device, dtype=torch.float64).expand(N, r, r).clone()
    buf = torch.zeros_like(R)
    opt = torch.optim.Adam([A, B], lr=cfg.lr)
    best = torch.full((N,), float("inf"), device=device)
    best_A, best_B, best_R = A.detach().clone(), B.detach().clone(), R.clone()
    start = None
    for step in range(cfg.steps + 1):
        Rf = R.float().requires_grad_(True)
        Am = A * rmask[:, None, :]
        Bm = B * rmask[:, :, None]
        E = batch.W - _ste_rows(Am @ Rf.transpose(1, 2), bits) @ _ste_rows(Rf @ Bm, bits)
        loss = ((batch.F * E * E).sum(-1) * batch.row_weight).sum(-1)
        with torch.no_grad():
            if start is None:
                start = loss.detach().clone()
            better = loss < best
            best = torch.where(better, loss.detach(), best)
            best_A[better], best_B[better], best_R[better] = A.detach()[better], B.detach()[better], R[better]
        if step == cfg.steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            G = Rf.grad.double() * block
            R, buf = cayley_step(R, G, cfg.cayley_lr, cfg.cayley_iters, buf, cfg.cayley_momentum)
            # The padding block stays the identity and the off-block entries zero (up to rounding).
            R = R * block + pad_eye
    Rb = best_R.float()
    A_out = (best_A * rmask[:, None, :]) @ Rb.transpose(1, 2)
    B_out = Rb @ (best_B * rmask[:, :, None])
    return A_out, B_out, start, best


# -- gathering units from the model -------------------------------------------------------------------
@dataclass
class _Unit:
    kind: str  # per_head, dense, joint
    modules: list[tuple[str, nn.Module]]  # (target, module) whose factors this unit holds
    head: int = 0
    A: list[torch.Tensor] = field(default_factory=list)  # one per target (rows of that target)
    B: torch.Tensor | None = None
    W: list[torch.Tensor] = field(default_factory=list)
    F: list[torch.Tensor] = field(default_factory=list)


def _low_rank_targets(model: nn.Module, adapter, layer: int) -> dict[str, nn.Module]:
    out = {}
    for t in TARGETS:
        mod = adapter.get_projection(model, layer, t)
        if isinstance(mod, LowRankLinear | PerHeadLowRankLinear | JointLowRankProjection):
            out[t] = mod
    return out


def _units(layer_mods: dict[str, nn.Module], fisher: dict[str, torch.Tensor], dev) -> list[_Unit]:
    units: list[_Unit] = []
    joint: dict[int, _Unit] = {}
    for t, mod in layer_mods.items():
        Ft = fisher[t].to(dev, torch.float32)
        if isinstance(mod, PerHeadLowRankLinear):
            Fh = Ft.view(mod.num_heads, mod.head_dim, -1)
            for h in range(mod.num_heads):
                a = mod.head_up(h).detach().to(dev, torch.float32)
                b = mod.head_down(h).detach().to(dev, torch.float32)
                units.append(_Unit("per_head", [(t, mod)], h, [a], b, [a @ b], [Fh[h]]))
        elif isinstance(mod, LowRankLinear):
            a = mod.up.weight.detach().to(dev, torch.float32)
            b = mod.down.weight.detach().to(dev, torch.float32)
            units.append(_Unit("dense", [(t, mod)], 0, [a], b, [a @ b], [Ft]))
        else:
            key = id(mod.shared)
            if key not in joint:
                b = mod.shared.down.weight.detach().to(dev, torch.float32)
                joint[key] = _Unit("joint", [], 0, [], b, [], [])
                units.append(joint[key])
            u = joint[key]
            a = mod.up.weight.detach().to(dev, torch.float32)
            u.modules.append((t, mod))
            u.A.append(a)
            u.W.append(a @ u.B)
            u.F.append(Ft)
    return units


def _batch(units: list[_Unit], dev) -> tuple[UnitBatch | None, list[int]]:
    """Pad the units (skipping those without any Fisher weight) into one batch; returns the kept indices."""
    kept, weights = [], []
    for i, u in enumerate(units):
        rw = []
        for W, F in zip(u.W, u.F):
            denom = float((F * W * W).sum())
            rw.append(torch.full((W.shape[0],), 1.0 / denom if denom > 0 else 0.0, device=dev))
        if any(float(w[0]) > 0 for w in rw):
            kept.append(i)
            weights.append(torch.cat(rw))
    if not kept:
        return None, []
    m = max(sum(a.shape[0] for a in units[i].A) for i in kept)
    r = max(units[i].B.shape[0] for i in kept)
    n = units[kept[0]].B.shape[1]
    N = len(kept)
    out = UnitBatch(
        A=torch.zeros(N, m, r, device=dev),
        B=torch.zeros(N, r, n, device=dev),
        W=torch.zeros(N, m, n, device=dev),
        F=torch.zeros(N, m, n, device=dev),
        row_weight=torch.zeros(N, m, device=dev),
    )
    for j, i in enumerate(kept):
        u = units[i]
        rows, k = sum(a.shape[0] for a in u.A), u.B.shape[0]
        out.A[j, :rows, :k] = torch.cat(u.A)
        out.B[j, :k] = u.B
        out.W[j, :rows] = torch.cat(u.W)
        out.F[j, :rows] = torch.cat(u.F)
        out.row_weight[j, :rows] = weights[j]
        out.ranks.append(k)
    return out, kept


def _write_back(u: _Unit, A: torch.Tensor, B: torch.Tensor) -> None:
    k = u.B.shape[0]
    with torch.no_grad():
        if u.kind == "per_head":
            _, mod = u.modules[0]
            lo, hi = mod.offsets[u.head], mod.offsets[u.head + 1]
            d = mod.head_dim
            mod.down.weight[lo:hi] = B[:k].to(mod.down.weight.dtype)
            mod.up_weight[:, lo:hi] = A[:d, :k].to(mod.up_weight.dtype)
        elif u.kind == "dense":
            _, mod = u.modules[0]
            rows = mod.up.weight.shape[0]
            mod.down.weight.copy_(B[:k])
            mod.up.weight.copy_(A[:rows, :k])
        else:
            u.modules[0][1].shared.down.weight.copy_(B[:k])
            lo = 0
            for _, mod in u.modules:
                rows = mod.up.weight.shape[0]
                mod.up.weight.copy_(A[lo : lo + rows, :k])
                lo += rows


# -- Fisher at the model as it is ----------------------------------------------------------------------
@contextlib.contextmanager
def _dense_stand_ins(model: nn.Module, adapter, targets: dict[tuple[int, str], nn.Module]) -> Iterator[None]:
    """Replace each low-rank projection by an ``nn.Linear`` of its weight ``A B`` (and bias) meanwhile."""
    try:
        for (layer, t), mod in targets.items():
            w = mod.weight.detach()
            lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, dtype=w.dtype, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            adapter.set_projection(model, layer, t, lin)
        yield
    finally:
        for (layer, t), mod in targets.items():
            adapter.set_projection(model, layer, t, mod)


class _Namespaced:
    """A view of a calibration cache whose entry names carry a prefix (QAT's statistics describe another
    model state than a decomposer's, though the engine would name them alike)."""

    def __init__(self, cache: Any, prefix: str) -> None:
        self.cache, self.prefix = cache, prefix

    def has(self, parts) -> bool:
        return self.cache.has((self.prefix, *parts))

    def get_or_compute(self, parts, fn):
        return self.cache.get_or_compute((self.prefix, *parts), fn)


class QATQuantizer(Quantizer):
    name = "qat"
    config_class = QATConfig
    summary = (
        "WSVD local QAT: per-head Cayley-SGD rotation of the rank dimension against the quantized factors"
    )
    needs_calibration = True

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        cfg = self.config
        model, adapter, info = job.model, job.adapter, job.info
        if job.weight_bits is None:
            raise LowRankError(
                "qat trains against the scheme's weight rounding, but this scheme has no weight bits"
            )
        check_not_quantized(model, "qat")
        if not job.calibration:
            raise CalibrationError(
                "qat needs calibration samples (for the Fisher weights), got none; give the recipe a calibration "
                "section or pass `calibration=` to compress()"
            )
        dev = torch.device(job.device)
        per_layer = {layer: _low_rank_targets(model, adapter, layer) for layer in range(info.num_layers)}
        targets = {(layer, t): mod for layer, mods in per_layer.items() for t, mod in mods.items()}
        if not targets:
            raise LowRankError(
                "qat rotates the rank dimension of low-rank factors, and this model has none; run a decomposer "
                "first (e.g. --method wsvd) or drop qat from the quantize step"
            )
        recorder = StageRecorder(job.reporter, dev)
        names = tuple(t for t in TARGETS if any(tt == t for _, tt in targets))
        cache = _Namespaced(job.cache, "qat") if job.cache is not None else None
        stats_job = DecomposeJob(
            model=model,
            adapter=adapter,
            info=info,
            targets=names,
            ratios={},
            calibration=job.calibration,
            reporter=job.reporter,
            device=dev,
            seed=job.seed,
            cache=cache,
            runner=job.runner,
        )
        with _dense_stand_ins(model, adapter, targets):
            grads = collect_gradient_stats(stats_job, recorder, fisher=True, samples=job.calibration)

        trained, skipped, start_sum, end_sum = 0, 0, 0.0, 0.0
        with recorder.stage("qat: rotations and factors", total=info.num_layers) as st:
            for layer, mods in per_layer.items():
                if not mods:
                    st.advance()
                    continue
                fisher = {t: grads.fisher.pop((layer, t)) for t in mods}
                units = _units(mods, fisher, dev)
                batch, kept = _batch(units, dev)
                skipped += len(units) - len(kept)
                if batch is None:
                    st.advance()
                    continue

                def train(batch=batch) -> dict[str, torch.Tensor]:
                    with torch.enable_grad():
                        A, B, start, end = train_units(batch, job.weight_bits, cfg)
                    return {"A": A, "B": B, "start": start, "end": end}

                parts = ("qat_layer", f"layer={layer}", f"units={len(kept)}", f"bits={job.weight_bits}")
                done = {k: v.to(dev) for k, v in cached(cache, parts, train).items()}
                for j, i in enumerate(kept):
                    _write_back(units[i], done["A"][j], done["B"][j])
                trained += len(kept)
                start_sum += float(done["start"].sum())
                end_sum += float(done["end"].sum())
                st.advance()
        return {
            "units_trained": trained,
            "units_without_fisher": skipped,
            "mean_loss_before": start_sum / trained if trained else 0.0,
            "mean_loss_after": end_sum / trained if trained else 0.0,
            "steps": cfg.steps,
            "lr": cfg.lr,
            "cayley_lr": cfg.cayley_lr,
            "calibration_loss": grads.mean_loss,
            **recorder.report(),
        }
