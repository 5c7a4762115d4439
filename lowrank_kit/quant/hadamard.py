"""``hadamard``: QuaRot-style rotation of the language model, exact in real arithmetic.

1. Every RMSNorm gain γ is folded into the linears that read the norm's output (q/k/v after the input
   norm, the MLP's input linears after the post-attention norm, lm_head after the final norm), and
   the norm's gain is set to 1. An RMSNorm without gain commutes with any orthogonal Q.
2. The residual stream is rotated by a seeded randomized Hadamard matrix ``Q = diag(±1) H / √n``:
   embeddings ``E ← E Q`` (every embedding block the adapter's ``embed_tokens`` holds), the projector's
   output linear (image features join the residual stream) ``W ← Qᵀ W``, inputs of q/k/v and the MLP's
   input linears ``W ← W Q``, outputs of o_proj and down_proj ``W ← Qᵀ W``, lm_head ``W ← W Q``.
   On low-rank projections the input side is the down-projection B, so latents do not change.
3. Online Hadamard before down_proj: its input is multiplied by ``H_I`` (Kronecker factors, see
   :mod:`lowrank_kit.quant.hadamard_matrices`) in the forward, and ``W_down ← W_down H_I``.
4. Across heads before o_proj: each V head's output is rotated by ``H_d`` offline (``A_V,h ← H_dᵀ A_V,h``,
   latents unchanged), the o_proj input is multiplied online by ``H_heads ⊗ I_d``, and
   ``W_o ← W_o (H_heads ⊗ H_d)``.

Everything is computed in fp64 and cast back to each weight's dtype. QK-norm and q/k biases are
untouched (only the input side of q and k changes); a V bias is rotated with its head. Tied input and
output embeddings are untied (the final norm's gain goes into lm_head only) unless ``untie_embeddings``
is false, which is then an error. Post-norm layers (``norm_after``) cannot be rotated: their norm sits
on the residual stream itself.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lowrank_kit.errors import LowRankError
from lowrank_kit.methods.base import MethodConfig, QuantizeJob, Quantizer
from lowrank_kit.models.base import TARGETS, get_submodule, set_submodule
from lowrank_kit.quant import hadamard_matrices as hm
from lowrank_kit.quant.folding import map_rows, rotate_input, rotate_output, rotate_output_heads
from lowrank_kit.quant.modules import HadamardInput, HadamardTransform
from lowrank_kit.quant.structure import check_not_quantized, is_tied, untie_embeddings

log = logging.getLogger(__name__)


class HadamardConfig(MethodConfig):
    seed: int = Field(0, ge=0, description="seed of the random signs of the residual rotation")
    online_down: bool = Field(True, description="online Hadamard on the input of down_proj")
    online_o: bool = Field(True, description="online Hadamard across heads on the input of o_proj")
    untie_embeddings: bool = Field(
        True, description="untie tied input/output embeddings (else a tied model is an error)"
    )


def _check_rms_norm(norm: nn.Module, where: str, device: torch.device) -> torch.Tensor:
    """γ of an RMSNorm-like module, after checking numerically that it is one: ``norm(x) = γ ⊙ r(x)``
    with ``r`` commuting with rotations. Anything else (LayerNorm's mean, Gemma's 1 + γ) is an error."""
    gamma = getattr(norm, "weight", None)
    if not isinstance(gamma, torch.Tensor) or gamma.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise LowRankError(
            f"{where} is a {type(norm).__name__} without a single gain vector (or with a bias); the "
            "hadamard rotation needs RMSNorm layers"
        )
    n = gamma.shape[0]
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(8, n, generator=gen, dtype=torch.float32).to(gamma.device)
    # A Householder reflection stands in for Q: orthogonal, and cheap at any width.
    v = torch.randn(n, generator=gen, dtype=torch.float32).to(gamma.device)
    v = v / v.norm()

    def reflect(t: torch.Tensor) -> torch.Tensor:
        return t - 2 * (t @ v)[:, None] * v

    saved = gamma.detach().clone()
    try:
        with torch.no_grad():
            full = norm(x.to(gamma.dtype)).float()
            gamma.fill_(1.0)
            plain = norm(x.to(gamma.dtype)).float()
            rotated = norm(reflect(x).to(gamma.dtype)).float()
    finally:
        with torch.no_grad():
            gamma.copy_(saved)
    tol = 1e-4 if gamma.dtype == torch.float32 else 2e-2
    ok_gain = (full - plain * saved.float()).norm() <= tol * full.norm()
    ok_rot = (rotated - reflect(plain)).norm() <= tol * plain.norm()
    if not (ok_gain and ok_rot):
        raise LowRankError(
            f"{where} ({type(norm).__name__}) does not behave as an RMSNorm (gain times a rotation-invariant "
            "normalization); the hadamard rotation would change the model's outputs"
        )
    return saved.to(device, torch.float64)


def projector_output(model: nn.Module, adapter, hidden: int) -> tuple[str, nn.Linear]:
    """The linear whose output enters the residual stream from the vision side: the last ``nn.Linear`` (in
    module order) of the adapter's projector with ``hidden`` outputs."""
    root = get_submodule(model, adapter.projector)
    found = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.Linear) and m.out_features == hidden]
    if not found:
        raise LowRankError(
            f"the projector {adapter.projector!r} of this {adapter.display_name} model has no nn.Linear with "
            f"{hidden} outputs, so its image features cannot be rotated into the residual stream"
        )
    name, linear = found[-1]
    return f"{adapter.projector}.{name}" if name else adapter.projector, linear


def _transform(factors: list[hm.Factor | None], orders: list[int]) -> HadamardTransform:
    return HadamardTransform.from_factors(factors, orders)


class HadamardQuantizer(Quantizer):
    name = "hadamard"
    config_class = HadamardConfig
    summary = "QuaRot-style rotation: norm gains folded, residual Hadamard, online Hadamards (exact in fp)"

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        cfg = self.config
        model, adapter, info = job.model, job.adapter, job.info
        dev = torch.device(job.device)
        check_not_quantized(model, "hadamard")
        if adapter.norm_after(model.config):
            raise LowRankError(
                f"this {adapter.display_name} model normalizes after each block (norm_after), on the residual "
                "stream itself, so a residual rotation cannot be folded; drop hadamard from the quantize step"
            )
        untied = False
        if is_tied(model, adapter):
            if not cfg.untie_embeddings:
                raise LowRankError(
                    "the model ties its input and output embeddings, which the rotation must treat "
                    "differently (the final norm's gain goes into lm_head only); set "
                    "hadamard.untie_embeddings: true or drop hadamard"
                )
            untie_embeddings(model, adapter)
            untied = True
            log.info("untied the input and output embeddings for the hadamard rotation")

        n, d = info.hidden_size, info.head_dim
        fallbacks: list[str] = []
        residual_factors = hm.orthogonal_factors(n, cfg.seed, what="the residual stream")
        if residual_factors[0].kind == "orthogonal":
            fallbacks.append(f"residual ({n})")
        signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(cfg.seed)) * 2 - 1
        # Q = diag(signs) · (F_1 ⊗ F_2 ...), applied to rows through its Kronecker factors: n·Σ orders
        # multiply-adds a row instead of n² (a 152k-row embedding table of width 3584: 23× fewer).
        signs64 = signs.to(dev, torch.float64)
        q_orders = [f.order for f in residual_factors]
        q_mats = [m.to(dev) for m in hm.factor_matrices(residual_factors)]

        def Q(rows: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
            """``rows · diag(scale) · Q`` (fp64)."""
            x = rows * signs64 if scale is None else rows * (scale * signs64)
            return hm.kron_apply(x, q_orders, q_mats)

        layers = adapter.decoder_layers(model)
        with job.reporter.stage("hadamard: rotate", total=len(layers) + 2) as st:
            embed = get_submodule(model, adapter.embed_tokens)
            rotated_embed = 0
            for p in embed.parameters(recurse=True):
                if p.is_floating_point() and p.dim() == 2 and p.shape[-1] == n:
                    map_rows(p, Q, dev)
                    rotated_embed += 1
            if not rotated_embed:
                raise LowRankError(
                    f"{adapter.embed_tokens!r} holds no embedding table of width {n} to rotate"
                )
            proj_path = None
            if not adapter.text_only:
                proj_path, proj = projector_output(model, adapter, n)
                rotate_output(proj, Q, proj_path, device=dev)
            loose = _rotate_loose_parameters(model, adapter, Q, n, dev)
            st.advance()

            head_factors = (
                hm.orthogonal_factors(d, cfg.seed, what="the head dimension") if cfg.online_o else None
            )
            Hd = hm.dense(head_factors).to(dev) if head_factors else None
            heads_factors = (
                hm.orthogonal_factors(info.num_heads, cfg.seed, what="the attention heads")
                if cfg.online_o
                else None
            )
            if head_factors and head_factors[0].kind == "orthogonal":
                fallbacks.append(f"head_dim ({d})")
            if heads_factors and heads_factors[0].kind == "orthogonal":
                fallbacks.append(f"heads ({info.num_heads})")
            inter_factors: dict[int, list[hm.Factor]] = {}
            for i, layer in enumerate(layers):
                where = f"layer {i}"
                gamma = _check_rms_norm(get_submodule(layer, adapter.input_norm), f"{where} input norm", dev)
                M = functools.partial(Q, scale=gamma)
                done: set[int] = set()
                for t in TARGETS:
                    rotate_input(adapter.get_projection(model, i, t), M, f"{where} {t}", done, device=dev)
                _reset_gain(get_submodule(layer, adapter.input_norm))

                o_path = adapter.projection_path(i, "o_proj")
                o_proj = get_submodule(model, o_path)
                if cfg.online_o:
                    v = adapter.get_projection(model, i, "v_proj")
                    rotate_output_heads(v, Hd, info.num_kv_heads, f"{where} v_proj")
                    if o_proj.in_features != info.num_heads * d:
                        raise LowRankError(
                            f"{where} o_proj reads {o_proj.in_features} features, not heads × head_dim = "
                            f"{info.num_heads * d}"
                        )
                    mats = [*(m.to(dev) for m in hm.factor_matrices(heads_factors)), Hd]
                    orders = [*(f.order for f in heads_factors), d]
                    rotate_input(
                        o_proj,
                        lambda rows, m=mats, o=orders: hm.kron_apply(rows, o, m),
                        f"{where} o_proj",
                        device=dev,
                    )
                rotate_output(o_proj, Q, f"{where} o_proj", device=dev)
                if cfg.online_o:
                    online = _transform([*heads_factors, None], [*(f.order for f in heads_factors), d])
                    set_submodule(model, o_path, HadamardInput(online.to(o_proj.weight.device), o_proj))

                gamma2 = _check_rms_norm(
                    get_submodule(layer, adapter.post_attention_norm), f"{where} post-attention norm", dev
                )
                M2 = functools.partial(Q, scale=gamma2)
                for key, path in adapter.mlp.items():
                    if key == "down_proj":
                        continue
                    rotate_input(get_submodule(layer, path), M2, f"{where} {key}", device=dev)
                _reset_gain(get_submodule(layer, adapter.post_attention_norm))
                down_path = adapter.mlp["down_proj"]
                down = get_submodule(layer, down_path)
                if cfg.online_down:
                    inter = down.in_features
                    if inter not in inter_factors:
                        inter_factors[inter] = hm.orthogonal_factors(
                            inter, cfg.seed, what="the MLP intermediate size"
                        )
                        if inter_factors[inter][0].kind == "orthogonal":
                            fallbacks.append(f"intermediate ({inter})")
                    factors = inter_factors[inter]
                    mats = [m.to(dev) for m in hm.factor_matrices(factors)]
                    orders = [f.order for f in factors]
                    rotate_input(
                        down,
                        lambda rows, m=mats, o=orders: hm.kron_apply(rows, o, m),
                        f"{where} down_proj",
                        device=dev,
                    )
                rotate_output(down, Q, f"{where} down_proj", device=dev)
                if cfg.online_down:
                    online = _transform(list(factors), [f.order for f in factors])
                    set_submodule(layer, down_path, HadamardInput(online.to(down.weight.device), down))
                st.advance()

            final = get_submodule(model, adapter.final_norm)
            gamma_f = _check_rms_norm(final, "the final norm", dev)
            lm_head = get_submodule(model, adapter.lm_head)
            rotate_input(lm_head, functools.partial(Q, scale=gamma_f), "lm_head", device=dev)
            _reset_gain(final)
            st.advance()

        for what in fallbacks:
            log.warning(
                "hadamard: a seeded random orthogonal matrix stands in for the Hadamard matrix of the %s",
                what,
            )
        return {
            "seed": cfg.seed,
            "residual": hm.describe(residual_factors),
            "head_dim": hm.describe(head_factors) if head_factors else None,
            "heads": hm.describe(heads_factors) if heads_factors else None,
            "intermediate": {str(k): hm.describe(v) for k, v in inter_factors.items()}
            if cfg.online_down
            else None,
            "online_down": cfg.online_down,
            "online_o": cfg.online_o,
            "random_orthogonal_fallbacks": fallbacks,
            "untied_embeddings": untied,
            "projector_output": proj_path,
            "rotated_parameters": loose,
        }


def _rotate_loose_parameters(model: nn.Module, adapter, Q, n: int, dev: torch.device) -> list[str]:
    """Rotate the parameters that sit between the vision side and the language model.

    A parameter outside the vision tower, the projector, the language model and lm_head can only be on
    the path of image features into the residual stream (LLaVA-NeXT's ``image_newline``, a learned
    vector appended to each row of image features): one of width ``hidden`` is rotated like an
    embedding; anything else cannot be placed, which is an error rather than a silently wrong model.
    """
    roots = [adapter.vision_tower, adapter.projector, adapter.language_model, adapter.lm_head]
    rotated = []
    for name, p in model.named_parameters():
        if any(name.startswith(r + ".") for r in roots if r):
            continue
        if not (p.is_floating_point() and p.shape and p.shape[-1] == n):
            raise LowRankError(
                f"parameter {name!r} {list(p.shape)} sits between the vision side and the language model but is "
                f"not {n} wide, so the residual rotation cannot be applied to it; drop hadamard for this model"
            )
        map_rows(p.view(-1, n), Q, dev)
        rotated.append(name)
    return rotated


def _reset_gain(norm: nn.Module) -> None:
    with torch.no_grad():
        norm.weight.fill_(1.0)
