"""Launch geometry of the Triton latent-attention kernels, in plain Python (no Triton import).

Which kernel serves a layer (:func:`uses_heads_kernel`), how the per-head kernel packs runs of adjacent
heads into programs (:func:`head_blocks`), block sizes from the launch tables, and how many sequence
splits a call gets (:func:`plan_launch`). ``triton.py`` launches what this module decides; benchmarks and
tests import the same rules from here, without a GPU or Triton.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lowrank_kit.kernels.latent_attention.layout import HEADS_COLUMNS, HEADS_MAX, LatentWeights


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and schedule of one launch. ``split_len`` 0 lets :func:`plan_launch` choose it per call.

    ``heads_per_program`` > 0 selects the per-head kernel (:func:`uses_heads_kernel`): each program
    scores a run of at most that many consecutive KV heads whose K and V latents fit ``columns`` columns
    (:func:`head_blocks`); ``rank_chunk`` / ``v_chunk`` are ignored. 0 selects the grouped kernel, which
    rebuilds K in ``rank_chunk``-row chunks and accumulates V in ``v_chunk``-wide chunks.

    ``maxnreg`` > 0 caps the registers a thread may use (ptxas spills what does not fit), trading spills
    for more resident programs per SM; 0 leaves the choice to the compiler. Ignored off CUDA.
    """

    block_n: int
    num_warps: int
    num_stages: int
    rank_chunk: int
    v_chunk: int
    split_len: int = 0
    heads_per_program: int = 0
    columns: int = HEADS_COLUMNS
    maxnreg: int = 0


def cdiv(a: int, b: int) -> int:
    # Host-side ceil division: triton.cdiv is a jit function, and calling one from Python costs ~7 µs
    # (five per launch were half of the launcher's own time).
    return -(-a // b)


def pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# (widest K chunk, widest V chunk) → (block_n, num_warps, num_stages), from the launch sweep of
# benchmarks/attention_decode.py on an H200 (docs/kernel.md lists it). Keys are upper bounds, checked in
# order; the last row covers the shared-latent shapes (rank chunked to 64, V chunks of 256).
_TABLE: tuple[tuple[int, int, tuple[int, int, int]], ...] = (
    (64, 64, (64, 4, 3)),
    (64, 128, (64, 4, 2)),
    (1 << 30, 1 << 30, (32, 8, 2)),
)


# Per-head kernel: heads adjacent in the cached row are packed into programs of at most `columns` K and V latent
# columns (and at most 16 heads), then (block_n, num_warps, num_stages) by the padded column count. From
# the launch sweep of benchmarks/attention_decode.py on an H100 (docs/kernel.md): 128 columns, 64-token
# tiles, 4 warps and 2 stages measured fastest (two rank-64 heads: 442 µs at B=16, 8192 tokens, against
# 543-871 µs with 8 warps, 542-629 µs with one head and 546 µs with four heads a program).
_HEADS_TABLE: tuple[tuple[int, tuple[int, int, int]], ...] = (
    (128, (64, 4, 2)),
    (256, (64, 8, 2)),
    (1 << 30, (32, 8, 2)),
)


def uses_heads_kernel(w: LatentWeights) -> bool:
    """Whether the per-head kernel serves this layer: every KV head has its own K and V latent (WSVD's
    per-head factors, any ranks) and one query head per KV head (MHA). Shared, grouped and joint latents
    and GQA run on the grouped kernel, which rebuilds each KV head's keys once for all its query heads."""
    heads = tuple(range(w.num_kv_heads))
    return (
        w.queries_per_kv == 1
        and w.k_layout.head_group == heads
        and w.v_layout.head_group == heads
        and w.k_layout.order == w.v_layout.order  # a program's K and V latents: one run of heads each
    )


@functools.lru_cache(maxsize=1024)
def head_blocks(
    k_widths: tuple[int, ...], v_widths: tuple[int, ...], columns: int, max_heads: int
) -> tuple[tuple[int, int], ...]:
    """Runs of consecutive heads ``(first, count)``, each adding heads while its K and its V latents stay
    within ``columns`` (a head wider than that is a run of its own) and it holds at most ``max_heads``."""
    blocks: list[tuple[int, int]] = []
    first, kc, vc = 0, 0, 0
    for j, (kw, vw) in enumerate(zip(k_widths, v_widths)):
        count = j - first
        if count and (kc + kw > columns or vc + vw > columns or count == max_heads):
            blocks.append((first, count))
            first, kc, vc = j, 0, 0
        kc, vc = kc + kw, vc + vw
    blocks.append((first, len(k_widths) - first))
    return tuple(blocks)


def row_widths(w: LatentWeights) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """K and V widths of the heads in row order (the per-head kernel packs runs of adjacent heads)."""
    order = w.k_layout.order
    return tuple(w.k_layout.widths[g] for g in order), tuple(w.v_layout.widths[g] for g in order)


class HeadGeometry(NamedTuple):
    blocks: tuple[tuple[int, int], ...]
    heads: int  # most heads in one program
    k_columns: int  # padded K columns of the widest program (a power of two, at least 16)
    v_columns: int


@functools.lru_cache(maxsize=1024)
def head_geometry(
    k_widths: tuple[int, ...], v_widths: tuple[int, ...], columns: int, max_heads: int
) -> HeadGeometry:
    """The programs of the per-head kernel and their compile-time sizes, computed once per layout (the
    launch asks for them at every decode step of every layer)."""
    blocks = head_blocks(k_widths, v_widths, columns, max_heads)

    def padded(widths: tuple[int, ...]) -> int:
        return max(16, pow2(max(sum(widths[f : f + n]) for f, n in blocks)))

    return HeadGeometry(blocks, max(n for _, n in blocks), padded(k_widths), padded(v_widths))


def heads_launch_config(
    batch: int,
    max_len: int,
    w: LatentWeights,
    device: torch.device,
    heads_per_program: int = 0,
    columns: int = HEADS_COLUMNS,
) -> LaunchConfig:
    """Launch of the per-head kernel: heads packed into programs of at most ``columns`` latent columns
    and ``heads_per_program`` heads (0: up to :data:`HEADS_MAX`), block sizes from the table."""
    max_heads = heads_per_program if heads_per_program > 0 else HEADS_MAX
    geo = head_geometry(*row_widths(w), columns, max_heads)
    if device.type != "cuda":
        block_n, warps, stages = 16, 4, 1
    else:
        block_n, warps, stages = next(cfg for limit, cfg in _HEADS_TABLE if geo.k_columns <= limit)
    split_len = _split_len(batch, len(geo.blocks), max_len, block_n, device)
    return LaunchConfig(block_n, warps, stages, 0, 0, split_len, max_heads, columns)


def launch_config(
    batch: int, num_kv_heads: int, max_len: int, w: LatentWeights, device: torch.device
) -> LaunchConfig:
    """The kernel that serves this layer (:func:`uses_heads_kernel`), block sizes from its table, and a
    split length so that the grid covers the GPU about four times."""
    if uses_heads_kernel(w):
        return heads_launch_config(batch, max_len, w, device)
    return grouped_launch_config(batch, num_kv_heads, max_len, w, device)


def grouped_launch_config(
    batch: int, num_kv_heads: int, max_len: int, w: LatentWeights, device: torch.device
) -> LaunchConfig:
    """Launch of the grouped kernel (any layout): rank and V chunks, block sizes from its table."""
    kw, vw = w.k_layout.max_width, w.out_width
    # U_K,j stays in registers only up to 64 rows; wider ranks go in chunks of 64 (a [128, d] U in
    # registers spilled and ran 3.5x slower on an H200).
    rank_chunk = max(16, pow2(kw)) if kw <= 64 else 64
    v_chunk = max(16, pow2(vw)) if vw <= 128 else 256
    if device.type != "cuda":
        # The interpreter runs every program in Python: small tiles keep tests quick while still
        # exercising several tiles and splits per row.
        block_n, warps, stages = 16, 4, 1
    else:
        for k_max, v_max, cfg in _TABLE:
            if rank_chunk <= k_max and v_chunk <= v_max:
                block_n, warps, stages = cfg
                break
    split_len = _split_len(batch, num_kv_heads * cdiv(vw, v_chunk), max_len, block_n, device)
    return LaunchConfig(block_n, warps, stages, rank_chunk, v_chunk, split_len)


def _split_len(batch: int, programs_per_row: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Tokens per split, a multiple of ``block_n``, so that the grid covers the GPU about four times
    over (rows × KV heads × V chunks × splits); long rows with many heads get one split each."""
    per_split = batch * programs_per_row
    target = 4 * _sm_count(device)
    n_splits = max(1, min(cdiv(target, per_split), cdiv(max(max_len, 1), block_n)))
    return cdiv(cdiv(max(max_len, 1), n_splits), block_n) * block_n


class LaunchPlan(NamedTuple):
    """One call's launch, resolved: its configuration, the programs along the sequence and across heads,
    and the shape of the split partials that pass 2 merges."""

    config: LaunchConfig
    geometry: HeadGeometry | None  # the per-head kernel's programs; None for the grouped kernel
    n_vchunks: int  # grouped kernel: V chunks per KV head (1 for the per-head kernel)
    split_len: int
    n_splits: int  # 1: pass 1 writes the output directly, no partials and no merge
    partials_shape: tuple[int, int, int, int]  # [B, H_q, n_splits, out_width] fp32; the LSEs drop out_width


def plan_launch(
    batch: int, max_len: int, w: LatentWeights, device: torch.device, config: LaunchConfig | None = None
) -> LaunchPlan:
    """The launch of one decode step over ``batch`` rows of at most ``max_len`` tokens: ``config`` (default
    :func:`launch_config`; ``heads_per_program`` > 0 needs :func:`uses_heads_kernel`) with its split length
    chosen when it is 0."""
    cfg = config or launch_config(batch, w.num_kv_heads, max_len, w, device)
    if cfg.heads_per_program > 0:
        if not uses_heads_kernel(w):
            raise ValueError(
                "heads_per_program > 0 needs per-head K and V latents and one query head per KV head; "
                f"this layer has {w.queries_per_kv} query heads per KV head and K groups {w.k_layout.head_group}"
            )
        geo = head_geometry(*row_widths(w), cfg.columns, cfg.heads_per_program)
        n_vchunks, programs = 1, len(geo.blocks)
    else:
        geo = None
        n_vchunks = cdiv(w.out_width, cfg.v_chunk)
        programs = w.num_kv_heads * n_vchunks
    split_len = cfg.split_len or _split_len(batch, programs, max_len, cfg.block_n, device)
    n_splits = max(1, cdiv(max(max_len, 1), split_len))
    return LaunchPlan(cfg, geo, n_vchunks, split_len, n_splits, (batch, w.num_heads, n_splits, w.out_width))
