"""Symmetric integer quantization: weights per output channel with a clip search, activations per token,
latents per (token, group); int4 packing.

Conventions: ``qmax = 2^(bits−1) − 1`` (127 for int8, 7 for int4); a value ``x`` with scale ``s`` becomes
``q = clamp(round(x / s), −qmax, qmax)`` and is read back as ``q · s``. A zero scale (an all-zero row or
group) is replaced by 1 so that dequantization stays finite. Scales and rounding are computed in fp32
whatever the tensor's dtype.

Weight clip search (METHODS.md §3): per output channel, the clip ratio ``p = 1 − i/100`` (i = 0..79) that
minimizes ``Σ |Q(w; p) − w|^2.4`` with ``s = p · max|w| / qmax``. Since p = 1 is one of the candidates,
the search never does worse on that measure than plain max scaling.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

CLIP_GRID = tuple(1.0 - i / 100 for i in range(80))
CLIP_NORM = 2.4
SUPPORTED_BITS = (4, 8)


def qmax(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"integer quantization supports {SUPPORTED_BITS} bits, got {bits}")
    return 2 ** (bits - 1) - 1


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``clamp(round(x / scale))`` (int8 tensor); ``scale`` broadcasts against ``x``."""
    m = qmax(bits)
    return torch.round(x.float() / scale).clamp_(-m, m).to(torch.int8)


# -- weights -------------------------------------------------------------------------------------------
@dataclass
class QuantizedWeight:
    """``W ≈ q · scale[:, None]``: ``q`` int8 [out, in] (values within ±qmax), ``scale`` fp32 [out]."""

    q: torch.Tensor
    scale: torch.Tensor
    bits: int
    clip: torch.Tensor  # fp32 [out], the chosen clip ratio per channel

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def clip_error(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row ``Σ |Q(w) − w|^2.4`` (fp32) for ``scale`` [rows]."""
    wf = w.float()
    deq = quantize_with_scale(wf, scale[:, None], bits).float() * scale[:, None]
    return (deq - wf).abs_().pow_(CLIP_NORM).sum(-1)


def quantize_weight(
    w: torch.Tensor, bits: int, *, clip_search: bool = True, chunk_rows: int = 4096
) -> QuantizedWeight:
    """Per-output-channel symmetric quantization of ``w`` [out, in], with the clip search or plain max."""
    if w.dim() != 2:
        raise ValueError(f"weights to quantize must be 2-D [out, in], got shape {tuple(w.shape)}")
    m = qmax(bits)
    wf = w.detach().float()
    amax = wf.abs().amax(-1)
    best_clip = torch.ones_like(amax)
    if clip_search:
        for lo in range(0, wf.shape[0], chunk_rows):
            rows = wf[lo : lo + chunk_rows]
            a = amax[lo : lo + chunk_rows]
            best = torch.full_like(a, float("inf"))
            for p in CLIP_GRID:
                err = clip_error(rows, _safe(a * p / m), bits)
                better = err < best
                best = torch.where(better, err, best)
                best_clip[lo : lo + chunk_rows] = torch.where(better, p, best_clip[lo : lo + chunk_rows])
    scale = _safe(amax * best_clip / m)
    return QuantizedWeight(quantize_with_scale(wf, scale[:, None], bits), scale, bits, best_clip)


# -- activations and latents -------------------------------------------------------------------------
def quantize_tokens(x: torch.Tensor, bits: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (the last dim), symmetric: integers (int8) and scales ``s = clip · max|x| / qmax``
    (fp32 [..., 1])."""
    m = qmax(bits)
    xf = x.float()
    scale = _safe(xf.abs().amax(-1, keepdim=True) * clip / m)
    return torch.round(xf / scale).clamp_(-m, m).to(torch.int8), scale


def fake_quant_tokens(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Quantize → dequantize per token (:func:`quantize_tokens`), back in ``x``'s dtype."""
    q, scale = quantize_tokens(x, bits, clip)
    return (q.float() * scale).to(x.dtype)


def group_index(widths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """For each column of a latent made of groups of ``widths``, its group number (made once per widths
    and device: a forward then does no host-to-device copy, which a CUDA graph capture would refuse).
    Read-only: callers index with it."""
    return _group_index(tuple(int(w) for w in widths), torch.device(device))


@functools.lru_cache(maxsize=256)
def _group_index(widths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths)).to(device)


def group_scales(x: torch.Tensor, widths: tuple[int, ...], bits: int) -> torch.Tensor:
    """Per (token, group) scales ``max|x_group| / qmax`` (fp32, [..., groups]) of a latent [..., Σ widths]."""
    if x.shape[-1] != sum(widths):
        raise ValueError(f"latent has width {x.shape[-1]}, the groups {list(widths)} sum to {sum(widths)}")
    xf = x.float().abs()
    index = group_index(widths, x.device).expand_as(xf)
    amax = xf.new_zeros(*xf.shape[:-1], len(widths)).scatter_reduce_(-1, index, xf, "amax")
    return _safe(amax / qmax(bits))


def fake_quant_groups(x: torch.Tensor, widths: tuple[int, ...], bits: int) -> torch.Tensor:
    """Quantize → dequantize a latent [..., Σ widths] with one symmetric scale per (token, group).

    Bit-identical to storing it with :func:`lowrank_kit.kernels.latent_attention.layout.quantize_int8`
    (or ``quantize_int4``) and reading it back as ``q · scale``, which is what the decode kernel does.
    """
    scale = group_scales(x, widths, bits)
    full = scale[..., group_index(widths, x.device)]
    m = qmax(bits)
    return (torch.round(x.float() / full).clamp_(-m, m) * full).to(x.dtype)


# -- int4 packing --------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values [..., n] (int8 in [−8, 7]) → uint8 [..., ceil(n/2)]: column 2j in the low
    nibble, column 2j+1 in the high nibble, each as a 4-bit two's complement (an odd n pads with 0)."""
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4 takes int8 values, got {q.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4 takes values in [-8, 7]")
    n = q.shape[-1]
    if n % 2:
        q = torch.cat([q, q.new_zeros(*q.shape[:-1], 1)], dim=-1)
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [..., ceil(n/2)] → int8 [..., n]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 takes uint8, got {packed.dtype}")
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    both = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :n]
    return torch.where(both >= 8, both - 16, both)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Storage form of integers ``q``: int8 as is for 8 bits, packed nibbles for 4 bits."""
    return q if bits == 8 else pack_int4(q)


def unpack(stored: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return stored if bits == 8 else unpack_int4(stored, n)


def stored_columns(n: int, bits: int) -> int:
    return n if bits == 8 else (n + 1) // 2
