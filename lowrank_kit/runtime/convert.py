"""From a compressed attention module to what its latent decode step reads (done once per layer).

:func:`layer_factors` reads one decoder layer: the K and V low-rank modules (per-head, one shared
latent, or QSVD's joint latent that K and V share), their up-projections per KV head, biases, the
latent bits of quantized modules (``module.kv_bits``), the QK-norm gain and epsilon, RoPE and the
softmax scale. Everything is kept as fp32 masters; :meth:`LayerFactors.materialize` turns them into
the kernel's :class:`~lowrank_kit.kernels.latent_attention.layout.LatentWeights` and the V
up-projection on one device in one dtype.

Up-projections are read through the modules' accessors (``head_up``, the ``up`` linear's weight). When
a module's ``up`` is not a plain floating-point linear (a quantized replacement), the matrix is read by
applying ``up`` to the identity: ``up(I) − up(0)``, so whatever ``up`` computes is what decode uses.
The runtime never reads a down-projection: latents always come from ``module.latent(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_kit.kernels.latent_attention.layout import (
    LatentLayout,
    LatentWeights,
    RopeSpec,
    align_for,
    pack_order,
)
from lowrank_kit.kernels.latent_attention.naive import head_tables
from lowrank_kit.models.base import AttentionInfo
from lowrank_kit.modules import JointLowRankProjection, LowRankLinear, PerHeadLowRankLinear
from lowrank_kit.ratios import shares_latent
from lowrank_kit.runtime.errors import LatentDecodeError

KV_BITS = (8, 4)


@dataclass
class KVFactors:
    """One of K or V: which latent layout it has and each KV head's up-projection (fp32 masters)."""

    kind: str  # "per_head" (one latent per KV head) or "shared" (one latent read by every KV head)
    ranks: tuple[int, ...]  # per KV head for "per_head", (r,) for "shared"
    ups: list[torch.Tensor]  # per KV head: U_j [rank of its group, head_dim]
    bias: torch.Tensor | None  # [H_kv, head_dim]
    bits: int | None
    # Applied to a latent before it is cached in 16 bits: the up input's activation fake quantization.
    pre_quant: Any = None

    def layout(self, num_kv_heads: int, align: int) -> LatentLayout:
        if self.kind == "per_head":
            return LatentLayout.per_head(self.ranks, align)
        return LatentLayout.shared(self.ranks[0], num_kv_heads, align)


@dataclass(frozen=True)
class LatentFormat:
    """The shape of one layer's cached latents: what a cache layer allocates."""

    k_width: int
    v_width: int | None  # None: V reads K's latent (one cached latent)
    dtype: torch.dtype  # storage dtype: the model's, or int8 for quantized latents
    k_groups: int
    v_groups: int
    num_positions: int
    norm_heads: int  # 0: no QK-norm scale; 1: one per token ("full"); H_kv: one per KV head ("per_head")


@dataclass
class Materialized:
    """A layer's decode-time tensors on one device in one dtype."""

    weights: LatentWeights
    v_up: torch.Tensor  # [H_kv, V width, d] in the model dtype
    v_bias: torch.Tensor | None  # [H_kv, d]
    k_up_raw: torch.Tensor | None  # [H_kv, K width, d] fp32, QK-norm gain not folded (for 1/rms)
    k_bias_raw: torch.Tensor | None
    k_pack: torch.Tensor | None  # packed column of each latent column; None when packing is the identity
    v_pack: torch.Tensor | None
    k_quant: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (group index, valid, column group)
    v_quant: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    format: LatentFormat
    k_heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # naive.head_tables of K


@dataclass
class LayerFactors:
    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    k: KVFactors
    v: KVFactors
    joint: bool  # K and V share one latent (QSVD): it is cached once
    rope: RopeSpec
    scale: float
    qk_norm: str | None
    norm_gain: torch.Tensor | None  # [d] ("per_head") or [H_kv·d] ("full"), fp32
    norm_eps: float
    _materialized: dict = field(default_factory=dict, repr=False)

    @property
    def bits(self) -> int | None:
        return self.k.bits

    def materialize(self, device: torch.device, dtype: torch.dtype) -> Materialized:
        key = (str(device), dtype)
        hit = self._materialized.get(key)
        if hit is not None:
            return hit
        storage = torch.int8 if self.bits else dtype
        align = align_for(storage)
        hkv = self.num_kv_heads
        k_layout = self.k.layout(hkv, align)
        v_layout = k_layout if self.joint else self.v.layout(hkv, align)
        if self.k.kind == self.v.kind == "per_head" and not self.joint and self.num_heads == hkv:
            # The per-head kernel's layout: heads in the row in an order that packs ragged ranks into few
            # programs (uniform ranks keep the head order).
            order = pack_order(k_layout.widths, v_layout.widths)
            k_layout, v_layout = k_layout.with_order(order), v_layout.with_order(order)
        gains = self._head_gains()
        k_ups = [u * g[None, :] for u, g in zip(self.k.ups, gains)]
        k_up = k_layout.up_rows(k_ups).to(device=device, dtype=dtype)
        k_bias = None
        if self.k.bias is not None:
            k_bias = (self.k.bias * torch.stack(gains)).to(device=device, dtype=torch.float32)
        rope = RopeSpec(self.rope.inv_freq.to(device), self.rope.attention_factor, self.rope.mrope_section)
        weights = LatentWeights(
            k_layout, v_layout, k_up, rope, self.num_heads, self.scale, k_bias, self.qk_norm
        )
        v_up = v_layout.up_rows(self.v.ups).to(device=device, dtype=dtype)
        v_bias = None if self.v.bias is None else self.v.bias.to(device=device, dtype=dtype)
        k_up_raw = k_bias_raw = None
        if self.qk_norm is not None:
            k_up_raw = k_layout.up_rows(self.k.ups).to(device=device, dtype=torch.float32)
            if self.k.bias is not None:
                k_bias_raw = self.k.bias.to(device=device, dtype=torch.float32)
        norm_heads = 0 if self.qk_norm is None else (hkv if self.qk_norm == "per_head" else 1)
        fmt = LatentFormat(
            k_layout.row_width,
            None if self.joint else v_layout.row_width,
            storage,
            k_layout.num_groups,
            v_layout.num_groups,
            rope.num_positions,
            norm_heads,
        )
        mat = Materialized(
            weights,
            v_up,
            v_bias,
            k_up_raw,
            k_bias_raw,
            _pack_index(k_layout, device),
            None if self.joint else _pack_index(v_layout, device),
            _quant_tables(k_layout, device) if self.bits else None,
            _quant_tables(v_layout, device) if self.bits and not self.joint else None,
            fmt,
            head_tables(k_layout, device),
        )
        self._materialized[key] = mat
        return mat

    def _head_gains(self) -> list[torch.Tensor]:
        """Per KV head, the QK-norm gain folded into U_K (ones without QK-norm)."""
        d = self.head_dim
        if self.norm_gain is None:
            return [torch.ones(d)] * self.num_kv_heads
        if self.qk_norm == "per_head":
            return [self.norm_gain] * self.num_kv_heads
        return [self.norm_gain[j * d : (j + 1) * d] for j in range(self.num_kv_heads)]


def _pack_index(layout: LatentLayout, device: torch.device) -> torch.Tensor | None:
    if layout.row_width == layout.latent_width:
        return None
    return layout.packed_columns().to(device)


def _quant_tables(
    layout: LatentLayout, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather table [groups, widest group] of each group's packed columns, its validity, and for every
    packed column the group whose scale divides it (row padding past the last group reads group 0: its
    values are zero)."""
    wmax = max(layout.widths)
    cols = torch.arange(wmax)
    offs = torch.tensor(layout.offsets)
    wids = torch.tensor(layout.widths)
    valid = cols[None, :] < wids[:, None]
    index = torch.where(valid, offs[:, None] + cols[None, :], torch.zeros_like(cols)[None, :])
    col_group = torch.zeros(layout.row_width, dtype=torch.long)
    for g, (o, w) in enumerate(zip(layout.offsets, layout.widths)):
        col_group[o : o + w] = g
    return index.to(device), valid.to(device), col_group.to(device)


def quantize_latents(
    packed: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per (token, group) quantization of packed latents [..., row_width].

    Returns (q int8 [..., row_width], scale fp32 [..., groups]) with ``packed ≈ q · scale``; for 8 bits
    this is exactly :func:`~lowrank_kit.kernels.latent_attention.layout.quantize_int8` (same formula,
    vectorized over groups so that a decode step costs a few kernels, not a few per group). 4-bit
    latents are stored one value per byte (the kernel reads int8), in [-7, 7].
    """
    qmax = float(2 ** (bits - 1) - 1)
    index, valid, col_group = tables
    x = packed.float()
    blocks = x[..., index] * valid  # [..., G, W]
    s = blocks.abs().amax(dim=-1) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(x / s[..., col_group]).clamp_(-qmax, qmax).to(torch.int8)
    return q, s


# -- reading one layer ----------------------------------------------------------------------------------
def _describe(mod: nn.Module) -> str:
    return type(mod).__name__


def _up_matrix(mod: nn.Module, width: int, out: int, dtype: torch.dtype) -> torch.Tensor:
    """[latent width, out features] fp32: the map from a latent to the projection's output, bias excluded."""
    up = getattr(mod, "up", None)
    weight = getattr(up, "weight", None)  # nn.Linear, or a quantized linear's dequantized weight
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.shape == (out, width):
        return weight.detach().float().T
    if not callable(up):
        raise LatentDecodeError(f"{_describe(mod)} has no up-projection `up(latent)` to read")
    device = next((p.device for p in mod.parameters()), torch.device("cpu"))
    eye = torch.eye(width, dtype=dtype, device=device)
    with torch.no_grad():
        return (up(eye).float() - up(torch.zeros(1, width, dtype=dtype, device=device)).float()).detach()


def _head_ups(
    mod: nn.Module, kind: str, ranks: tuple[int, ...], target: str, layer: int, info: AttentionInfo, dtype
) -> list[torch.Tensor]:
    """Each KV head's up-projection U_j [rank, d] (fp32): the rows of its latent, its d output columns."""
    hkv, d = info.num_kv_heads, info.head_dim
    if isinstance(mod, PerHeadLowRankLinear):
        # head_up is A_h (dequantized for a quantized subclass).
        return [mod.head_up(j).detach().float().T.contiguous() for j in range(hkv)]
    width = sum(ranks)
    full = _up_matrix(mod, width, hkv * d, dtype)
    if full.shape != (width, hkv * d):
        raise LatentDecodeError(
            f"layer {layer} {target}: its up-projection maps {full.shape[0]} → {full.shape[1]}, expected "
            f"{width} → {hkv * d}"
        )
    return [full[:, j * d : (j + 1) * d].contiguous() for j in range(hkv)]


def _latent_input_quant(mod: nn.Module, target: str, layer: int):
    """What the module's up-projection does to a latent before multiplying it: the activation fake-quant
    of a quantized model (``up_input_quant`` of a quantized per-head module, ``up.input_quant`` of a
    quantized linear), or None. Decode must read the latent exactly as ``up`` would."""
    up = getattr(mod, "up", None)
    if getattr(up, "output_quant", None) is not None:
        raise LatentDecodeError(
            f"layer {layer} {target} quantizes its up-projection's output (a K/V cache of full keys); the latent "
            "cache holds latents, so it cannot reproduce that"
        )
    if isinstance(mod, PerHeadLowRankLinear):
        return getattr(mod, "up_input_quant", None)
    return getattr(up, "input_quant", None)


def _kv_factors(
    mod: nn.Module, target: str, layer: int, info: AttentionInfo, dtype: torch.dtype
) -> KVFactors:
    hkv, d = info.num_kv_heads, info.head_dim
    if isinstance(mod, PerHeadLowRankLinear):
        if mod.num_heads != hkv or mod.head_dim != d:
            raise LatentDecodeError(
                f"layer {layer} {target} has {mod.num_heads} heads of dim {mod.head_dim}; the model has "
                f"{hkv} KV heads of dim {d}"
            )
        kind, ranks = "per_head", tuple(mod.ranks)
    elif isinstance(mod, LowRankLinear | JointLowRankProjection):
        if mod.out_features != hkv * d:
            raise LatentDecodeError(
                f"layer {layer} {target} has {mod.out_features} outputs; the model's K/V have {hkv}×{d}"
            )
        kind, ranks = "shared", (int(mod.rank),)
    else:
        raise LatentDecodeError(
            f"latent decode needs low-rank K and V projections, but layer {layer} {target} is a "
            f"{_describe(mod)}; compress K and V (e.g. --method wsvd, svdllm or qsvd) or generate without "
            "latent decode"
        )
    bits = getattr(mod, "kv_bits", None)
    if bits is not None and bits not in KV_BITS:
        raise LatentDecodeError(
            f"layer {layer} {target} has kv_bits={bits!r}; latent decode stores {', '.join(map(str, KV_BITS))}-bit "
            "latents or 16-bit ones (kv_bits None)"
        )
    ups = _head_ups(mod, kind, ranks, target, layer, info, dtype)
    bias = getattr(mod, "bias", None)
    bias = None if bias is None else bias.detach().float().reshape(hkv, d).cpu()
    # With kv_bits the up input quantizer is the per-(token, group) latent quantization the int cache
    # stores exactly; without, a latent is cached in 16 bits after the up input's own fake quantization.
    pre = _latent_input_quant(mod, target, layer)
    if bits is not None:
        pre = None
    return KVFactors(kind, ranks, [u.cpu() for u in ups], bias, None if bits is None else int(bits), pre)


def _rms_norm_params(norm: nn.Module, width: int, what: str) -> tuple[torch.Tensor, float]:
    """Gain and epsilon of a plain RMSNorm ``g ⊙ x / sqrt(mean(x²) + eps)``, checked by applying it."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    eps = getattr(norm, "eps", None) if eps is None else eps
    if weight is None or eps is None or weight.numel() != width:
        raise LatentDecodeError(
            f"{what} ({_describe(norm)}) is not an RMSNorm of width {width} with `weight` and an epsilon; "
            "latent decode folds only plain RMSNorm gains"
        )
    gain = weight.detach().float().cpu()
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = norm(x.to(weight.device)).float().cpu()
    want = gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(eps))
    # fp32 arithmetic on both sides; a gain in 16 bits is exact in fp32, so only summation order differs.
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise LatentDecodeError(
            f"{what} ({_describe(norm)}) does not compute g ⊙ x / sqrt(mean(x²) + eps); latent decode folds "
            "only plain RMSNorm gains"
        )
    return gain, float(eps)


def layer_factors(
    attn: nn.Module,
    projections: dict[str, nn.Module],
    layer: int,
    info: AttentionInfo,
    rope: RopeSpec,
    dtype: torch.dtype,
) -> LayerFactors:
    """Read decoder layer ``layer``'s attention (``projections``: q_proj, k_proj, v_proj, o_proj modules)."""
    k_mod, v_mod = projections["k_proj"], projections["v_proj"]
    k = _kv_factors(k_mod, "k_proj", layer, info, dtype)
    v = _kv_factors(v_mod, "v_proj", layer, info, dtype)
    joint = shares_latent(k_mod, v_mod)
    if joint and k.pre_quant != v.pre_quant:
        raise LatentDecodeError(
            f"layer {layer}: K and V read their shared latent through different input quantizers "
            f"({k.pre_quant} and {v.pre_quant}); one cached latent cannot serve both"
        )
    if k.bits != v.bits:
        raise LatentDecodeError(
            f"layer {layer}: k_proj stores {k.bits or 16}-bit latents and v_proj {v.bits or 16}-bit ones; the "
            "decode kernel reads K and V latents of one kind"
        )
    gain, eps = None, 0.0
    if info.qk_norm is not None:
        width = info.head_dim if info.qk_norm == "per_head" else info.num_kv_heads * info.head_dim
        for name in ("q_norm", "k_norm"):
            if not isinstance(getattr(attn, name, None), nn.Module):
                raise LatentDecodeError(
                    f"layer {layer}: the adapter says qk_norm={info.qk_norm!r} but the attention module "
                    f"({_describe(attn)}) has no `{name}`"
                )
        gain, eps = _rms_norm_params(attn.k_norm, width, f"layer {layer} k_norm")
    scale = float(getattr(attn, "scaling", info.head_dim**-0.5))
    return LayerFactors(
        layer=layer,
        num_heads=info.num_heads,
        num_kv_heads=info.num_kv_heads,
        head_dim=info.head_dim,
        k=k,
        v=v,
        joint=joint,
        rope=rope,
        scale=scale,
        qk_norm=info.qk_norm,
        norm_gain=gain,
        norm_eps=eps,
    )


def check_geometry(info: AttentionInfo, where: Any) -> None:
    d = info.head_dim
    if d % 2 or d & (d - 1):
        raise LatentDecodeError(
            f"{where}: head_dim {d} is not a power of two; the latent decode kernel needs one (64, 128, 256)"
        )
