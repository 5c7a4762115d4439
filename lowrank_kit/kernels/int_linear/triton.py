"""Triton weight-only integer GEMM: ``y = x · (q · s)ᵀ`` with int8 or packed-int4 ``q`` dequantized in
registers, so the weights cross memory as integers (1 or ½ byte each) and no float copy exists.

``x`` [M, K] (fp16 / bf16 / fp32), ``q`` [N, K] int8 or [N, ⌈K/2⌉] uint8 (two signed nibbles per byte,
column 2j low, 2j+1 high: :func:`lowrank_kit.quant.primitives.pack_int4`), ``s`` [N] fp32 per output
channel. Products accumulate in fp32 on the tensor cores (the dequantized tile is cast to ``x``'s dtype;
the integers are exact in it), the per-channel scale is applied once to the accumulator. fp32 inputs
multiply in full fp32 (``input_precision="ieee"``), not TF32, so that they agree with the CPU path.

The launch shape is chosen from (M, N, K) by :func:`launch_config`, not autotuned: a decode step
replayed from a CUDA graph must not trigger a benchmark sweep, and the first call compiles only once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowrank_kit.kernels import interpreting


@dataclass(frozen=True)
class IntLinearConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swapped: bool = False  # the weight tile as the dot's first operand (few rows)
    split_k: int = 1  # programs per output tile along K (fp32 partial sums, summed after the kernel)


def launch_config(m: int, n: int, k: int, bits: int = 8) -> IntLinearConfig:
    """Decode-sized inputs (≤ 16 rows) are a weight stream: narrow column tiles give every SM a share of
    the rows of ``q`` (the shapes measured best on an H100 at 8 rows over LLaVA-NeXT-7B's layers,
    ``benchmarks/int_linear.py --parts sweep``: 405-866 GB/s, still slower than fp16). The swapped-operand
    and split-K launches (``swapped=True``, ``split_k > 1``) are correct on an H100 (the GPU tests) but their
    speed is not yet measured (the sweep covers them), so neither is the default.
    Larger inputs use square-ish tensor-core tiles."""
    if interpreting():
        return IntLinearConfig(16, 16, 32, 1, 1)
    if m <= 16:
        return IntLinearConfig(16, 32, 256, 4, 3) if bits == 8 else IntLinearConfig(16, 16, 128, 4, 5)
    if m <= 64:
        return IntLinearConfig(64, 64, 128, 4, 3)
    return IntLinearConfig(128, 128, 64, 8, 3)


@triton.jit
def _int_linear_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_ym,
    stride_ys,
    k_chunk,
    BITS: tl.constexpr,
    IEEE: tl.constexpr,
    SWAPPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``y = x · Wᵀ`` a [BLOCK_M, BLOCK_N] tile at a time; ``SWAPPED`` computes the tile as ``W · xᵀ``
    instead: the weight tile [BLOCK_N, BLOCK_K] is the dot's first operand, read in its stored
    K-contiguous order, and the few input rows fill the small second dimension. Program ``pid_k`` covers
    ``k_chunk`` columns of K (a multiple of BLOCK_K) and writes its partial sum at ``pid_k * stride_ys``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk0 = tl.arange(0, BLOCK_K)
    # Tiles are indexed [n, k] (weights) and [k, m] (inputs) when swapped, [k, n] and [m, k] otherwise.
    if SWAPPED:
        n_idx = rn[:, None]
        m_idx = rm[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        n_idx = rn[None, :]
        m_idx = rm[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_chunk
    for k0 in range(k_lo, tl.minimum(k_lo + k_chunk, K), BLOCK_K):
        rk = k0 + rk0
        if SWAPPED:
            k_w = rk[None, :]  # k along the weight tile
            k_x = rk[:, None]  # k along the input tile
        else:
            k_w = rk[:, None]
            k_x = rk[None, :]
        x = tl.load(x_ptr + m_idx * stride_xm + k_x * stride_xk, mask=(m_idx < M) & (k_x < K), other=0.0)
        wmask = (n_idx < N) & (k_w < K)
        if BITS == 8:
            w = tl.load(q_ptr + n_idx * stride_qn + k_w, mask=wmask, other=0).to(tl.int32)
        else:
            byte = tl.load(q_ptr + n_idx * stride_qn + k_w // 2, mask=wmask, other=0).to(tl.int32)
            nib = (byte >> ((k_w % 2) * 4)) & 0xF
            w = tl.where(nib >= 8, nib - 16, nib)
        w = w.to(x.dtype)
        if SWAPPED:
            if IEEE:
                acc += tl.dot(w, x, input_precision="ieee")
            else:
                acc += tl.dot(w, x)
        else:
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
    scale = tl.load(s_ptr + n_idx, mask=n_idx < N, other=0.0)
    tl.store(
        y_ptr + pid_k * stride_ys + m_idx * stride_ym + n_idx,
        (acc * scale).to(y_ptr.dtype.element_ty),
        mask=(m_idx < M) & (n_idx < N),
    )


def int_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    in_features: int,
    config: IntLinearConfig | None = None,
) -> torch.Tensor:
    """``x`` [..., K] → [..., N] in ``x``'s dtype (see the module docstring); ``config`` overrides
    :func:`launch_config` (for benchmarks)."""
    if qweight.stride(-1) != 1:  # the kernel reads rows of q with unit stride along K
        qweight = qweight.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m, n = x2.shape[0], qweight.shape[0]
    if m == 0:
        return x2.new_empty(0, n).reshape(*lead, n)
    cfg = config or launch_config(m, n, in_features, bits)
    steps = triton.cdiv(in_features, cfg.block_k)
    split = max(1, min(cfg.split_k, steps))
    k_chunk = triton.cdiv(steps, split) * cfg.block_k
    split = triton.cdiv(in_features, k_chunk)  # no empty program along K
    if split == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:  # fp32 partial sums, one [m, n] slab per K chunk
        y = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    _int_linear_kernel[grid](
        x2,
        qweight,
        scale,
        y,
        m,
        n,
        in_features,
        x2.stride(0),
        x2.stride(1),
        qweight.stride(0),
        y.stride(-2),
        y.stride(0) if split > 1 else 0,
        k_chunk,
        BITS=bits,
        IEEE=x.dtype == torch.float32,
        SWAPPED=cfg.swapped,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split > 1:
        y = y.sum(0).to(x.dtype)
    return y.reshape(*lead, n)
