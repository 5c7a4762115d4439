"""Data layout of the latent cache and the static inputs of a latent-attention decode step.

A token's cached row holds the latents of every group side by side: group g starts at column
``offsets[g]`` and is ``widths[g]`` wide, its true rank rounded up to ``align`` elements (16 bytes of
the cache dtype) so that every group starts on an aligned address. Columns past a group's rank are
zero, and so are the matching rows of its up-projections, so the padding never changes a result. No
group is padded to the widest one: ragged ranks cost only their own bytes.

Group structure is data: ``head_group[j]`` is the group whose latent KV head j reads. Per-head latents
(WSVD) have one group per KV head, group-head latents (Palu) a group per few heads, one shared latent
(SVD-LLM/ASVD on K and V, QSVD's joint QKV) a single group for all heads.

Groups sit in the row in ``order`` (default: group 0, 1, ...). The per-head kernel packs runs of
groups that are adjacent in the row into one program of at most :data:`HEADS_COLUMNS` columns, so for
ragged ranks the runtime orders the groups by :func:`pack_order` (a first-fit-decreasing bin packing of
the K and V widths) instead of by head: adjacent heads rarely fit one program together, packed ones do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lowrank_kit.quant.primitives import pack_int4, unpack_int4

# Rows of the cache are padded to this many elements so that the row stride is divisible by 16, which
# lets Triton prove 16-byte alignment of every row and use vector loads.
ROW_MULTIPLE = 16
# The per-head kernel's programs: at most this many K (and V) latent columns and this many heads each.
HEADS_COLUMNS = 128
HEADS_MAX = 16


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def align_for(dtype: torch.dtype) -> int:
    """Group alignment in elements: 16 bytes of ``dtype`` (8 for fp16/bf16, 16 for int8)."""
    return max(1, 16 // torch.empty((), dtype=dtype).element_size())


@dataclass(frozen=True)
class LatentLayout:
    """Where each group's latent sits in a cached row, and which group each KV head reads."""

    ranks: tuple[int, ...]
    head_group: tuple[int, ...]
    align: int = 8
    order: tuple[int, ...] | None = None  # groups in row order; None: 0, 1, ...
    widths: tuple[int, ...] = field(init=False)
    offsets: tuple[int, ...] = field(init=False)
    row_width: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"every latent group needs rank >= 1, got ranks {list(self.ranks)}")
        if not self.head_group or min(self.head_group) < 0 or max(self.head_group) >= len(self.ranks):
            raise ValueError(
                f"head_group {list(self.head_group)} must name groups 0..{len(self.ranks) - 1} for every KV head"
            )
        if self.align < 1:
            raise ValueError(f"align must be at least 1, got {self.align}")
        order = tuple(range(len(self.ranks))) if self.order is None else tuple(int(g) for g in self.order)
        if sorted(order) != list(range(len(self.ranks))):
            raise ValueError(f"order {list(order)} must list every group 0..{len(self.ranks) - 1} once")
        widths = tuple(_round_up(int(r), self.align) for r in self.ranks)
        offsets = [0] * len(widths)
        end = 0
        for g in order:
            offsets[g] = end
            end += widths[g]
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        object.__setattr__(self, "head_group", tuple(int(g) for g in self.head_group))
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "row_width", _round_up(end, ROW_MULTIPLE))

    # -- constructors ------------------------------------------------------------------------------------
    @classmethod
    def per_head(
        cls, ranks: Sequence[int], align: int = 8, order: Sequence[int] | None = None
    ) -> LatentLayout:
        """One latent per KV head (WSVD); ``order``: the heads in row order (see the module docstring)."""
        return cls(tuple(ranks), tuple(range(len(ranks))), align, None if order is None else tuple(order))

    @classmethod
    def shared(cls, rank: int, num_kv_heads: int, align: int = 8) -> LatentLayout:
        """One latent read by every KV head (SVD-LLM/ASVD on K and V, QSVD)."""
        return cls((rank,), (0,) * num_kv_heads, align)

    @classmethod
    def grouped(cls, ranks: Sequence[int], heads_per_group: int, align: int = 8) -> LatentLayout:
        """One latent per run of ``heads_per_group`` consecutive KV heads (Palu's group-head latents)."""
        return cls(tuple(ranks), tuple(g for g in range(len(ranks)) for _ in range(heads_per_group)), align)

    # -- geometry ----------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.ranks)

    @property
    def num_kv_heads(self) -> int:
        return len(self.head_group)

    @property
    def max_width(self) -> int:
        return max(self.widths)

    @property
    def latent_width(self) -> int:
        """Width of the unpadded latent a projection produces (Σ ranks)."""
        return sum(self.ranks)

    def with_align(self, align: int) -> LatentLayout:
        return LatentLayout(self.ranks, self.head_group, align, self.order)

    def with_order(self, order: Sequence[int]) -> LatentLayout:
        return LatentLayout(self.ranks, self.head_group, self.align, tuple(order))

    @property
    def in_order(self) -> bool:
        """Whether groups sit in the row by their index."""
        return self.order == tuple(range(len(self.ranks)))

    def packed_columns(self) -> torch.Tensor:
        """For each column of the unpadded latent, its column in the packed row."""
        return torch.cat([torch.arange(r) + o for r, o in zip(self.ranks, self.offsets)])

    def head_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, valid)`` of shape [H_kv, max_width]: packed columns that KV head j reads."""
        cols = torch.arange(self.max_width)
        offs = torch.tensor([self.offsets[g] for g in self.head_group])
        wids = torch.tensor([self.widths[g] for g in self.head_group])
        valid = cols[None, :] < wids[:, None]
        index = torch.where(valid, offs[:, None] + cols[None, :], torch.zeros_like(cols)[None, :])
        return index, valid

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(offsets, widths, head_group)`` as int32 tensors on ``device`` for a kernel."""
        return (
            torch.tensor(self.offsets, dtype=torch.int32, device=device),
            torch.tensor(self.widths, dtype=torch.int32, device=device),
            torch.tensor(self.head_group, dtype=torch.int32, device=device),
        )

    # -- data --------------------------------------------------------------------------------------------
    def pack(self, latent: torch.Tensor) -> torch.Tensor:
        """[..., Σ ranks] (head after head, as the down-projections emit it) → [..., row_width]."""
        if latent.shape[-1] != self.latent_width:
            raise ValueError(
                f"latent has width {latent.shape[-1]}, the layout expects Σ ranks = {self.latent_width}"
            )
        if self.row_width == self.latent_width and self.in_order:
            return latent
        out = latent.new_zeros(*latent.shape[:-1], self.row_width)
        out[..., self.packed_columns().to(latent.device)] = latent
        return out

    def up_rows(self, ups: Sequence[torch.Tensor], rows: int | None = None) -> torch.Tensor:
        """Stack per-KV-head up-projections ``U_j`` ([rank of j's group, d]) into [H_kv, rows, d], zero-padded."""
        if len(ups) != self.num_kv_heads:
            raise ValueError(f"need {self.num_kv_heads} up-projections, got {len(ups)}")
        rows = self.max_width if rows is None else rows
        d = ups[0].shape[1]
        out = ups[0].new_zeros(self.num_kv_heads, rows, d)
        for j, u in enumerate(ups):
            r = self.ranks[self.head_group[j]]
            if u.shape != (r, d):
                raise ValueError(
                    f"KV head {j}: up-projection has shape {tuple(u.shape)}, expected ({r}, {d})"
                )
            out[j, :r] = u
        return out


def pack_order(
    k_widths: Sequence[int], v_widths: Sequence[int], columns: int = HEADS_COLUMNS, max_heads: int = HEADS_MAX
) -> tuple[int, ...]:
    """A row order of per-head latents that packs heads into few per-head-kernel programs.

    First-fit decreasing: heads by decreasing max(K width, V width) each go to the first program whose K
    and V columns stay within ``columns`` (and heads within ``max_heads``); the order lists the programs'
    heads program by program. The kernel's greedy packing of adjacent heads then finds exactly these
    programs (a head that opened a later program did not fit any earlier one, which only filled up after).
    Equal widths keep the head order (uniform ranks: pairs of adjacent heads, as before)."""
    if len(k_widths) != len(v_widths):
        raise ValueError(f"{len(k_widths)} K widths but {len(v_widths)} V widths")
    heads = sorted(range(len(k_widths)), key=lambda j: -max(k_widths[j], v_widths[j]))
    bins: list[list[int]] = []
    fill: list[list[int]] = []
    for j in heads:
        for b, (kc, vc) in enumerate(fill):
            if kc + k_widths[j] <= columns and vc + v_widths[j] <= columns and len(bins[b]) < max_heads:
                bins[b].append(j)
                fill[b] = [kc + k_widths[j], vc + v_widths[j]]
                break
        else:
            bins.append([j])
            fill.append([k_widths[j], v_widths[j]])
    return tuple(j for b in bins for j in b)


def quantize_int8(packed: torch.Tensor, layout: LatentLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per (token, group): ``packed ≈ q · scale``; returns (q [..., row_width] int8,
    scale [..., num_groups] fp32)."""
    x = packed.float()
    scales = []
    q = torch.zeros_like(x, dtype=torch.int8)
    for g in range(layout.num_groups):
        lo, hi = layout.offsets[g], layout.offsets[g] + layout.widths[g]
        block = x[..., lo:hi]
        # An all-zero group gets scale 1 so that dequantization stays finite (0 · 1 = 0).
        s = block.abs().amax(dim=-1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[..., lo:hi] = torch.round(block / s[..., None]).clamp_(-127, 127).to(torch.int8)
        scales.append(s)
    return q, torch.stack(scales, dim=-1)


def quantize_int4(packed: torch.Tensor, layout: LatentLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per (token, group), the int8 scale layout with ``qmax = 7``: returns (q
    [..., row_width / 2] uint8, two columns a byte: column 2j in the low nibble, 2j+1 in the high one,
    4-bit two's complement; scale [..., num_groups] fp32). ``packed ≈ unpack(q) · scale``."""
    if layout.row_width % 2:
        raise ValueError(f"int4 rows pack two columns a byte; row_width {layout.row_width} is odd")
    x = packed.float()
    scales = []
    q = torch.zeros_like(x, dtype=torch.int8)
    for g in range(layout.num_groups):
        lo, hi = layout.offsets[g], layout.offsets[g] + layout.widths[g]
        block = x[..., lo:hi]
        s = block.abs().amax(dim=-1) / 7.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[..., lo:hi] = torch.round(block / s[..., None]).clamp_(-7, 7).to(torch.int8)
        scales.append(s)
    return pack_int4(q), torch.stack(scales, dim=-1)


def dequantize_latents(
    q: torch.Tensor, scale: torch.Tensor, layout: LatentLayout, bits: int = 8
) -> torch.Tensor:
    """Packed rows back to fp32 [..., row_width]: ``q · scale`` of each column's group (int8 rows, or
    int4 rows as :func:`quantize_int4` writes them)."""
    values = q if bits == 8 else unpack_int4(q, layout.row_width)
    group = torch.zeros(layout.row_width, dtype=torch.long)
    for g in range(layout.num_groups):
        group[layout.offsets[g] : layout.offsets[g] + layout.widths[g]] = g
    return values.float() * scale[..., group.to(scale.device)]


@dataclass(frozen=True)
class RopeSpec:
    """RoPE as a decode kernel rebuilds it: ``angle = position[component(i)] · inv_freq[i]``.

    ``inv_freq`` ([d/2], fp32) already carries the scaling of its rope type (default, linear, llama3,
    yarn); ``attention_factor`` multiplies cos and sin (yarn's mscale). ``mrope_section`` splits the d/2
    frequencies into (time, height, width) sections, each rotated by its own position component
    (Qwen2-VL's M-RoPE); ``None`` means one position per token.
    """

    inv_freq: torch.Tensor
    attention_factor: float = 1.0
    mrope_section: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.mrope_section is not None and sum(self.mrope_section) != self.inv_freq.numel():
            raise ValueError(
                f"mrope_section {list(self.mrope_section)} sums to {sum(self.mrope_section)}, but there are "
                f"{self.inv_freq.numel()} rotary frequencies (head_dim / 2)"
            )

    @property
    def num_positions(self) -> int:
        return 1 if self.mrope_section is None else len(self.mrope_section)

    def section_index(self) -> torch.Tensor:
        """For each frequency, the position component that rotates it (all 0 without M-RoPE)."""
        if self.mrope_section is None:
            return torch.zeros(self.inv_freq.numel(), dtype=torch.int32)
        return torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(self.mrope_section)])


@dataclass
class LatentWeights:
    """Everything static one layer's decode step needs besides the cache.

    ``k_up`` is [H_kv, rows, d]: KV head j's K up-projection ``U_K,j`` (the transpose of A in
    ``W ≈ A B``) with any QK-norm gain folded in; rows past its group's rank are zero. ``k_bias``
    ([H_kv, d], fp32) is added after reconstruction and before RoPE. ``qk_norm`` says whether a
    per-token norm scale is cached ("per_head": one per KV head, "full": one per token). ``scale`` is
    the softmax scale (1/√d unless the model says otherwise). The V up-projection is not here: the
    kernel returns latents and the caller applies it (or has folded it into o_proj).
    """

    k_layout: LatentLayout
    v_layout: LatentLayout
    k_up: torch.Tensor
    rope: RopeSpec
    num_heads: int
    scale: float
    k_bias: torch.Tensor | None = None
    qk_norm: str | None = None
    # Device-side copies of the static tables a kernel launch needs, made once per (device, padding)
    # by the backend: building them per call costs host-to-device copies that stall every decode step.
    launch_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hkv, rows, d = self.k_up.shape
        if hkv != self.k_layout.num_kv_heads or hkv != self.v_layout.num_kv_heads:
            raise ValueError(
                f"k_up has {hkv} KV heads; the K layout has {self.k_layout.num_kv_heads} and the V layout "
                f"{self.v_layout.num_kv_heads}"
            )
        if rows < self.k_layout.max_width:
            raise ValueError(
                f"k_up has {rows} rows, fewer than the widest K group ({self.k_layout.max_width})"
            )
        if self.num_heads % hkv:
            raise ValueError(f"{self.num_heads} query heads is not a multiple of {hkv} KV heads")
        if 2 * self.rope.inv_freq.numel() != d:
            raise ValueError(
                f"rope has {self.rope.inv_freq.numel()} frequencies, head_dim {d} needs {d // 2}"
            )
        if self.qk_norm not in (None, "per_head", "full"):
            raise ValueError(f"qk_norm must be None, 'per_head' or 'full', got {self.qk_norm!r}")

    @property
    def num_kv_heads(self) -> int:
        return self.k_up.shape[0]

    @property
    def head_dim(self) -> int:
        return self.k_up.shape[2]

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def out_width(self) -> int:
        """Width of each query head's latent output (the widest V group)."""
        return self.v_layout.max_width


@dataclass
class LatentKV:
    """The cached tensors of one layer, as the decode step reads them.

    ``k``/``v``: [B, capacity, row_width] in fp16, bf16, fp32 or int8 (``v`` may be ``k`` itself when K
    and V share one latent). ``positions``: [B, capacity, num_positions] int32. ``k_scale``/``v_scale``:
    [B, capacity, num_groups] fp32 dequantization scales (int8 only). ``k_norm``: [B, capacity, 1 or
    H_kv] fp32, the 1/rms of each token's key (QK-norm models only).
    """

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.k.dtype == torch.int8
