"""Latent-attention decode in plain PyTorch: the ground truth the Triton kernel is tested against.

Everything runs in fp32 from the cached tensors, following KERNEL.md literally:

- K of KV head j at token t: ``rope(pos_t, n_t · ((z_t · C_K[t]) U_K,j + b_K,j))``
- scores ``q_h · K_t · scale`` over the tokens ``[start_b, end_b)`` of row b, softmax
- output ``Σ_t p_t · (z_t · C_V[t])`` in latent space (width of the widest V group; columns past a
  head's own group width are zero).

A row with no tokens (``end_b <= start_b``) returns zeros. The helpers :func:`head_latents`,
:func:`rope_cos_sin` and :func:`rebuild_keys` are shared with the runtime's prefill path.
"""

from __future__ import annotations

import torch

from lowrank_kit.kernels.latent_attention.layout import LatentKV, LatentLayout, LatentWeights, RopeSpec


def head_latents(
    cache: torch.Tensor,
    layout: LatentLayout,
    scale: torch.Tensor | None = None,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Dequantized latents per KV head: [B, S, row_width] → [B, S, H_kv, max_width] fp32 (padding zero).

    ``tables``: :func:`head_tables` already on the cache's device (saves host-to-device copies; a CUDA
    graph capture needs it)."""
    index, valid, group = tables if tables is not None else head_tables(layout, cache.device)
    x = cache[:, :, index].float()  # [B, S, H_kv, W]
    x = x * valid
    if scale is not None:
        x = x * scale[:, :, group].float()[..., None]
    return x


def head_tables(
    layout: LatentLayout, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index, valid, group)`` on ``device``: each KV head's packed columns, which of them are its own,
    and its scale group (see :meth:`LatentLayout.head_columns`)."""
    index, valid = layout.head_columns()
    group = torch.tensor(layout.head_group)
    return index.to(device), valid.to(device), group.to(device)


def rope_cos_sin(positions: torch.Tensor, rope: RopeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, S, d/2] (attention factor included) for positions [B, S, num_positions]."""
    sec = rope.section_index().to(positions.device).long()
    pos = positions[..., sec].float()  # [B, S, d/2]: each frequency's own position component
    angle = pos * rope.inv_freq.to(positions.device).float()
    return angle.cos() * rope.attention_factor, angle.sin() * rope.attention_factor


def rebuild_keys(kv: LatentKV, w: LatentWeights, length: int) -> torch.Tensor:
    """Keys of the first ``length`` cached tokens, RoPE applied: [B, H_kv, length, d] fp32."""
    lat = head_latents(kv.k[:, :length], w.k_layout, None if kv.k_scale is None else kv.k_scale[:, :length])
    rows = lat.shape[-1]
    k = torch.einsum("bshr,hrd->bhsd", lat, w.k_up[:, :rows].float())
    if w.k_bias is not None:
        k = k + w.k_bias.float()[None, :, None, :]
    if kv.k_norm is not None:
        k = k * kv.k_norm[:, :length].float().permute(0, 2, 1)[..., None]
    cos, sin = rope_cos_sin(kv.positions[:, :length], w.rope)
    cos, sin = cos[:, None], sin[:, None]
    half = k.shape[-1] // 2
    k1, k2 = k[..., :half], k[..., half:]
    return torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)


def latent_attention_decode(
    q: torch.Tensor, kv: LatentKV, w: LatentWeights, starts: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """One decode step. ``q``: [B, H_q, d] (RoPE applied); returns [B, H_q, out_width] fp32."""
    b, hq, d = q.shape
    hkv, qpk = w.num_kv_heads, w.queries_per_kv
    length = int(ends.max()) if ends.numel() else 0
    out = torch.zeros(b, hq, w.out_width, device=q.device, dtype=torch.float32)
    if length <= 0:
        return out
    keys = rebuild_keys(kv, w, length)  # [B, H_kv, S, d]
    qg = q.float().view(b, hkv, qpk, d)
    scores = torch.einsum("bhqd,bhsd->bhqs", qg, keys) * w.scale
    slot = torch.arange(length, device=q.device)
    valid = (slot[None, :] >= starts[:, None].long()) & (slot[None, :] < ends[:, None].long())  # [B, S]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Rows without tokens give all -inf scores, so softmax yields NaN; they are defined as zero output.
    probs = torch.nan_to_num(probs, nan=0.0)
    vlat = head_latents(
        kv.v[:, :length], w.v_layout, None if kv.v_scale is None else kv.v_scale[:, :length]
    )  # [B, S, H_kv, W]
    res = torch.einsum("bhqs,bshr->bhqr", probs, vlat)
    out[:, :, : res.shape[-1]] = res.reshape(b, hq, -1)
    return out
