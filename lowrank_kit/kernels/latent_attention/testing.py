"""Random latent-attention decode problems, shared by the kernel tests and the benchmark.

Inputs are drawn fresh from a seed every time (never zeros: zeros hide unwritten outputs and wrong
indexing). Values are scaled like a real layer's: up-projections normalised so rebuilt keys have unit
variance, latents of unit variance, positions spread over a long context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowrank_kit.kernels.latent_attention.launch import LaunchConfig, plan_launch
from lowrank_kit.kernels.latent_attention.layout import (
    LatentKV,
    LatentLayout,
    LatentWeights,
    RopeSpec,
    align_for,
    pack_order,
    quantize_int8,
)


@dataclass
class Problem:
    q: torch.Tensor
    kv: LatentKV
    w: LatentWeights
    starts: torch.Tensor
    ends: torch.Tensor

    @property
    def max_len(self) -> int:
        return int((self.ends - self.starts).max())

    def latent_bytes(self) -> int:
        """Bytes a decode step must read: each valid token's latents (+ scales, norms, positions) once."""
        tokens = int((self.ends - self.starts).clamp(min=0).sum())
        kv = self.kv
        per_token = kv.k.shape[2] * kv.k.element_size()
        if kv.v is not kv.k:
            per_token += kv.v.shape[2] * kv.v.element_size()
        per_token += kv.positions.shape[2] * 4
        for extra in (kv.k_scale, None if kv.v is kv.k else kv.v_scale, kv.k_norm):
            if extra is not None:
                per_token += extra.shape[2] * 4
        return tokens * per_token


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def make_problem(
    *,
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k_ranks: Sequence[int],
    v_ranks: Sequence[int],
    lengths: Sequence[int],
    dtype: torch.dtype = torch.float16,
    int8: bool = False,
    layout: str = "per_head",
    heads_per_group: int = 1,
    bias: bool = False,
    qk_norm: str | None = None,
    mrope_section: tuple[int, ...] | None = None,
    left_pad: Sequence[int] | None = None,
    capacity: int | None = None,
    positions: str = "random",
    head_order: str = "index",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Problem:
    """A random decode problem. Row b attends to slots ``[left_pad[b], left_pad[b] + lengths[b])``.

    ``positions``: "random" (each token's position drawn from [0, 30000): large angles, unrelated to the
    slot) or "sequential" (as in generation: slot minus the row's left padding, every component alike).

    ``layout``: "per_head" (one group per KV head; ``k_ranks``/``v_ranks`` per head), "grouped" (one
    group per ``heads_per_group`` heads; ranks per group) or "shared" (one group; one rank each).
    ``head_order`` (per_head): "index" (heads in the row by index) or "packed" (the row order the runtime
    gives MHA models, :func:`~lowrank_kit.kernels.latent_attention.layout.pack_order`).
    """
    dev = torch.device(device)
    # Drawn on the target device: benchmark shapes hold billions of latent elements.
    gen = torch.Generator(device=dev).manual_seed(seed)
    align = align_for(torch.int8 if int8 else dtype)
    if head_order not in ("index", "packed"):
        raise ValueError(f"unknown head_order {head_order!r}; available: index, packed")
    if layout == "per_head":
        kl, vl = LatentLayout.per_head(k_ranks, align), LatentLayout.per_head(v_ranks, align)
        if head_order == "packed":
            order = pack_order(kl.widths, vl.widths)
            kl, vl = kl.with_order(order), vl.with_order(order)
    elif layout == "grouped":
        kl = LatentLayout.grouped(k_ranks, heads_per_group, align)
        vl = LatentLayout.grouped(v_ranks, heads_per_group, align)
    elif layout == "shared":
        kl = LatentLayout.shared(k_ranks[0], num_kv_heads, align)
        vl = LatentLayout.shared(v_ranks[0], num_kv_heads, align)
    else:
        raise ValueError(f"unknown layout {layout!r}; available: grouped, per_head, shared")
    if kl.num_kv_heads != num_kv_heads:
        raise ValueError(f"the K layout covers {kl.num_kv_heads} KV heads, not {num_kv_heads}")
    left_pad = list(left_pad) if left_pad is not None else [0] * batch
    cap = capacity or max(p + n for p, n in zip(left_pad, lengths))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev)

    ups = []
    for j in range(num_kv_heads):
        r = kl.ranks[kl.head_group[j]]
        ups.append(randn(r, head_dim) / r**0.5)
    k_up = kl.up_rows(ups).to(dtype)
    k_bias = randn(num_kv_heads, head_dim) if bias else None
    factor = 1.0 if mrope_section is None else 1.25  # a yarn-like attention factor, exercised with M-RoPE
    rope = RopeSpec(rope_inv_freq(head_dim).to(dev), factor, mrope_section)
    w = LatentWeights(kl, vl, k_up, rope, num_heads, head_dim**-0.5, k_bias, qk_norm)

    def latents(lay: LatentLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = lay.pack(randn(batch, cap, lay.latent_width).to(torch.float32 if int8 else dtype))
        return quantize_int8(x, lay) if int8 else (x, None)

    k, k_scale = latents(kl)
    v, v_scale = latents(vl)
    npos = rope.num_positions
    # Positions are not slot indices: rows start at different offsets and M-RoPE components differ.
    if positions == "random":
        pos = torch.randint(0, 30000, (batch, cap, npos), generator=gen, dtype=torch.int32, device=dev)
    elif positions == "sequential":
        slot = torch.arange(cap, dtype=torch.int32, device=dev)[None, :]
        pad = torch.tensor(left_pad, dtype=torch.int32, device=dev)[:, None]
        pos = (slot - pad)[..., None].expand(batch, cap, npos).contiguous()
    else:
        raise ValueError(f"unknown positions {positions!r}; available: random, sequential")
    k_norm = None
    if qk_norm is not None:
        heads = num_kv_heads if qk_norm == "per_head" else 1
        k_norm = torch.rand(batch, cap, heads, generator=gen, device=dev) + 0.5
    kv = LatentKV(k, v, pos, k_scale, v_scale, k_norm)
    q = randn(batch, num_heads, head_dim).to(dtype)
    starts = torch.tensor(left_pad, dtype=torch.int32, device=dev)
    ends = torch.tensor([p + n for p, n in zip(left_pad, lengths)], dtype=torch.int32, device=dev)
    return Problem(q, kv, w, starts, ends)


def run_poisoned(p: Problem, config: LaunchConfig | None = None) -> torch.Tensor:
    """The Triton kernel's output on ``p`` (launch ``config``, default: the launcher's choice), its output
    buffer and split partials filled with NaN first, so an entry no program wrote stays NaN."""
    from lowrank_kit.kernels.latent_attention import triton as triton_impl  # Triton: only where it runs

    def nan(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.full(shape, float("nan"), device=p.q.device, dtype=dtype)

    max_len = p.kv.k.shape[1]  # the launcher's default, spelled out so that both plan the same launch
    plan = plan_launch(p.q.shape[0], max_len, p.w, p.q.device, config)
    shape = plan.partials_shape
    workspace = None if plan.n_splits == 1 else (nan(shape, torch.float32), nan(shape[:3], torch.float32))
    out = nan((p.q.shape[0], p.w.num_heads, p.w.out_width), p.q.dtype)
    triton_impl.latent_attention_decode(
        p.q, p.kv, p.w, p.starts, p.ends, max_len=max_len, config=config, out=out, workspace=workspace
    )
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64; NaN anywhere in ``out`` gives inf so that it never passes."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp(min=1e-30))
