"""Latent-attention decode: attention over a cache of low-rank latents instead of K and V.

:func:`latent_attention_decode` runs one decode step: it rebuilds K from the cached latents (RoPE
after reconstruction), attends with every query head, and returns each head's output in V's latent
space. ``backend="auto"`` runs the Triton kernel on CUDA tensors and the plain PyTorch twin
(``naive.py``) on the CPU; both compute the same function. Triton is imported only when the Triton
backend runs.
"""

from __future__ import annotations

import torch

from lowrank_kit.errors import LowRankError
from lowrank_kit.kernels import interpreting
from lowrank_kit.kernels.latent_attention import naive
from lowrank_kit.kernels.latent_attention.layout import (
    LatentKV,
    LatentLayout,
    LatentWeights,
    RopeSpec,
    align_for,
    quantize_int8,
)

__all__ = [
    "BACKENDS",
    "LatentKV",
    "LatentLayout",
    "LatentWeights",
    "RopeSpec",
    "align_for",
    "check_compiled",
    "check_inputs",
    "latent_attention_decode",
    "quantize_int8",
]

BACKENDS = ("auto", "naive", "triton")
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8)


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_inputs(
    q: torch.Tensor, kv: LatentKV, w: LatentWeights, starts: torch.Tensor, ends: torch.Tensor
) -> None:
    """Raise :class:`LowRankError` (one line) when the decode inputs do not fit together."""
    if q.dim() != 3:
        raise LowRankError(f"q must be [batch, query heads, head_dim], got shape {tuple(q.shape)}")
    b, hq, d = q.shape
    if hq != w.num_heads or d != w.head_dim:
        raise LowRankError(
            f"q has {hq} heads of dim {d}; the layer has {w.num_heads} query heads of dim {w.head_dim}"
        )
    if d % 2 or d & (d - 1):
        raise LowRankError(f"head_dim must be a power of two for the latent kernel, got {d}")
    for name, t, layout in (("k", kv.k, w.k_layout), ("v", kv.v, w.v_layout)):
        if t.dtype not in CACHE_DTYPES:
            raise LowRankError(f"{name} latents have dtype {t.dtype}; supported: {_names(CACHE_DTYPES)}")
        if t.dim() != 3 or t.shape[0] != b or t.shape[2] != layout.row_width:
            raise LowRankError(
                f"{name} latents have shape {tuple(t.shape)}; expected [{b}, capacity, {layout.row_width}]"
            )
        if t.stride(2) != 1:
            raise LowRankError(f"{name} latents must be contiguous in their last dimension")
    if (kv.k.dtype == torch.int8) != (kv.v.dtype == torch.int8):
        raise LowRankError(f"k and v latents must both be int8 or neither, got {kv.k.dtype} and {kv.v.dtype}")
    if kv.quantized:
        for name, s, layout in (("k_scale", kv.k_scale, w.k_layout), ("v_scale", kv.v_scale, w.v_layout)):
            if s is None:
                raise LowRankError(f"int8 latents need {name} [batch, capacity, {layout.num_groups}] fp32")
            if s.shape != (b, kv.k.shape[1], layout.num_groups) or s.dtype != torch.float32:
                raise LowRankError(
                    f"{name} has shape {tuple(s.shape)} and dtype {s.dtype}; expected "
                    f"[{b}, {kv.k.shape[1]}, {layout.num_groups}] float32"
                )
    elif kv.k_scale is not None or kv.v_scale is not None:
        raise LowRankError(f"scales were given for {kv.k.dtype} latents; only int8 latents take scales")
    elif kv.k.dtype != w.k_up.dtype:
        raise LowRankError(
            f"latents are {kv.k.dtype} but the up-projections are {w.k_up.dtype}; store them in one dtype"
        )
    npos = w.rope.num_positions
    if kv.positions.dtype != torch.int32 or kv.positions.shape != (b, kv.k.shape[1], npos):
        raise LowRankError(
            f"positions have shape {tuple(kv.positions.shape)} and dtype {kv.positions.dtype}; expected "
            f"[{b}, {kv.k.shape[1]}, {npos}] int32"
        )
    if (kv.k_norm is None) != (w.qk_norm is None):
        raise LowRankError(
            f"the layer has qk_norm={w.qk_norm!r} but k_norm was {'not ' if kv.k_norm is None else ''}given"
        )
    if kv.k_norm is not None:
        heads = w.num_kv_heads if w.qk_norm == "per_head" else 1
        if kv.k_norm.shape != (b, kv.k.shape[1], heads) or kv.k_norm.dtype != torch.float32:
            raise LowRankError(
                f"k_norm has shape {tuple(kv.k_norm.shape)} and dtype {kv.k_norm.dtype}; expected "
                f"[{b}, {kv.k.shape[1]}, {heads}] float32"
            )
    for name, t in (("starts", starts), ("ends", ends)):
        if t.shape != (b,) or t.dtype != torch.int32:
            raise LowRankError(f"{name} must be [{b}] int32, got shape {tuple(t.shape)} and dtype {t.dtype}")
    if len({q.device, kv.k.device, kv.v.device, w.k_up.device, starts.device}) != 1:
        raise LowRankError(
            f"inputs are on different devices: q {q.device}, k {kv.k.device}, v {kv.v.device}, "
            f"k_up {w.k_up.device}, starts {starts.device}"
        )


def check_compiled(head_dim: int) -> None:
    """Raise :class:`LowRankError` for a shape the compiled (not interpreted) Triton kernel cannot take.

    The score dot reduces over half a head (rotate-half RoPE splits ``d`` into two halves), and
    Triton's fp16/bf16 ``tl.dot`` on NVIDIA GPUs needs a reduction of at least 16 elements.
    """
    if head_dim < 32:
        raise LowRankError(
            f"the compiled Triton kernel needs head_dim >= 32 (its score dot reduces over head_dim/2 >= 16 "
            f"elements), got head_dim {head_dim}; use backend='naive' for this model"
        )


def latent_attention_decode(
    q: torch.Tensor,
    kv: LatentKV,
    w: LatentWeights,
    starts: torch.Tensor,
    ends: torch.Tensor,
    *,
    backend: str = "auto",
    max_len: int | None = None,
    check: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step over rows ``b`` attending to cache slots ``[starts[b], ends[b])``.

    ``q``: [B, H_q, d], RoPE (and QK-norm) already applied. Returns [B, H_q, w.out_width]: each query
    head's attention output in the latent space of its KV head's V group (zeros past the group's
    width), in ``q``'s dtype for the Triton backend and fp32 for the naive one. ``out``, if given,
    receives the result (Triton backend) or is filled from it (naive backend).
    """
    if backend not in BACKENDS:
        raise LowRankError(f"unknown latent-attention backend {backend!r}; available: {', '.join(BACKENDS)}")
    if check:
        check_inputs(q, kv, w, starts, ends)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "naive"
    if backend == "naive":
        res = naive.latent_attention_decode(q, kv, w, starts, ends)
        return res if out is None else out.copy_(res)
    if not q.is_cuda and not interpreting():
        raise LowRankError(
            f"the triton backend needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1; "
            "use backend='naive' or 'auto' on the CPU"
        )
    if q.is_cuda and not interpreting():
        check_compiled(w.head_dim)
    from lowrank_kit.kernels.latent_attention import triton as triton_impl  # Triton: only where it runs

    return triton_impl.latent_attention_decode(q, kv, w, starts, ends, max_len=max_len, out=out)
