"""Triton latent-attention decode: split-sequence (Flash-Decoding) over cached latents.

Pass 1, one program per (sequence split, KV head × V chunk, batch row):

- K is rebuilt on chip one tile of ``BN`` tokens at a time: ``C_K[tile] @ U_K,j`` with ``tl.dot``, in
  two halves so that RoPE (rotate_half layout) needs no shuffles; int8 scale, bias and norm scale are
  applied, then RoPE from ``inv_freq`` and per-token positions (three components for M-RoPE).
- Every query head that shares KV head j (GQA) is scored in the same program, so each latent tile is
  read once. Scores are computed transposed (``K_rot @ qᵀ``, [BN, QP]) so the rebuilt K feeds the next
  ``tl.dot`` from registers.
- V is never rebuilt: the program accumulates ``Σ p_t C_V[t]`` in latent space.
- Each split writes its normalized partial output and its log-sum-exp (base 2); pass 2 merges them.
  With a single split, pass 1 writes the output directly and pass 2 is skipped.

Variants are compile-time flags (int8, bias, norm scale, M-RoPE, rank chunking), not separate kernels.
Launch configuration comes from :func:`launch_config` (a small table keyed by shape), so the first call
compiles once and never autotunes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowrank_kit.kernels.latent_attention.layout import LatentKV, LatentWeights

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _sincos(x, FAST: tl.constexpr):
    # Angles reach 1e4..1e5 rad at long contexts. Reduce to [-π, π] with a two-part 2π (the high part
    # has 8 significant bits, so k·hi is exact for any k below 2^16), then evaluate.
    k = tl.floor(x * 0.15915494309189535 + 0.5)
    r = x - k * 6.28125
    r = r - k * 0.0019353071795864769
    if FAST:
        # The hardware approximations are accurate to ~1e-6 absolute on [-π, π] and cost one
        # special-function instruction each; libdevice's cosf/sinf would cost tens of instructions per
        # element, and RoPE needs d/2 of each per token per KV head.
        c = tl.inline_asm_elementwise(
            "cos.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1
        )
        s = tl.inline_asm_elementwise(
            "sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        c = tl.cos(r)
        s = tl.sin(r)
    return c, s


@triton.jit
def _dot_operand(x, CDT: tl.constexpr, DDT: tl.constexpr):
    # Round to the compute dtype, then hand the dot its operand dtype (the same, except bf16 under the
    # interpreter, whose bf16 dot is broken: values are rounded to bf16 and multiplied in fp32).
    return x.to(CDT).to(DDT)


@triton.jit
def _latent_decode_split(
    Q,
    K,
    V,
    KUP,
    KBIAS,
    POS,
    SEC,
    INVF,
    KSCALE,
    VSCALE,
    KNORM,
    K_OFF,
    K_WID,
    K_GRP,
    V_OFF,
    V_WID,
    V_GRP,
    STARTS,
    ENDS,
    PO,
    PL,
    OUT,
    q_scale,
    split_len,
    n_vchunks,
    out_width,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_uh,
    stride_ur,
    stride_pb,
    stride_ps,
    stride_zkb,
    stride_zks,
    stride_zvb,
    stride_zvs,
    stride_nb,
    stride_ns,
    stride_nh,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_ob,
    stride_oh,
    QPK: tl.constexpr,
    QP: tl.constexpr,
    D2: tl.constexpr,
    RKC: tl.constexpr,
    NRKC: tl.constexpr,
    RVC: tl.constexpr,
    BN: tl.constexpr,
    NPOS: tl.constexpr,
    INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    ALIGN_K: tl.constexpr,
    ALIGN_V: tl.constexpr,
    FAST_TRIG: tl.constexpr,
    DIRECT: tl.constexpr,
    CDT: tl.constexpr,
    DDT: tl.constexpr,
):
    split = tl.program_id(0)
    hv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    j = hv // n_vchunks
    vc = hv % n_vchunks

    start = tl.load(STARTS + b)
    end = tl.load(ENDS + b)
    lo = start + split * split_len
    hi = tl.minimum(end, lo + split_len)

    gk = tl.load(K_GRP + j)
    k_off = tl.multiple_of(tl.load(K_OFF + gk), ALIGN_K)
    k_wid = tl.multiple_of(tl.load(K_WID + gk), ALIGN_K)
    gv = tl.load(V_GRP + j)
    v_off = tl.multiple_of(tl.load(V_OFF + gv), ALIGN_V)
    v_wid = tl.multiple_of(tl.load(V_WID + gv), ALIGN_V)

    dd = tl.arange(0, D2)
    qi = tl.arange(0, QP)
    q_ok = qi < QPK
    heads = j * QPK + qi
    # qᵀ halves [D2, QP], pre-multiplied by softmax scale · log2(e) · the RoPE attention factor (which
    # multiplies the rebuilt K's cos and sin and so factors out of every score).
    q_ptr = Q + b * stride_qb + heads[None, :] * stride_qh + dd[:, None]
    q1t = tl.load(q_ptr, mask=q_ok[None, :], other=0.0).to(tl.float32) * q_scale
    q2t = tl.load(q_ptr + D2, mask=q_ok[None, :], other=0.0).to(tl.float32) * q_scale
    q1t = _dot_operand(q1t, CDT, DDT)  # [D2, QP]
    q2t = _dot_operand(q2t, CDT, DDT)

    invf = tl.load(INVF + dd)  # [D2]
    if NPOS > 1:
        sec = tl.load(SEC + dd)  # [D2] position component of each frequency
    if HAS_BIAS:
        kb1 = tl.load(KBIAS + j * 2 * D2 + dd)
        kb2 = tl.load(KBIAS + j * 2 * D2 + D2 + dd)

    rk = tl.arange(0, RKC)
    if NRKC == 1:
        # Per-head and group latents fit one chunk: U_K,j stays on chip for the whole sequence.
        u_ptr = KUP + j * stride_uh + rk[:, None] * stride_ur + dd[None, :]
        u1 = _dot_operand(tl.load(u_ptr), CDT, DDT)  # [RKC, D2]
        u2 = _dot_operand(tl.load(u_ptr + D2), CDT, DDT)

    rv = vc * RVC + tl.arange(0, RVC)
    rv_ok = rv < v_wid

    m_i = tl.full([QP], float("-inf"), tl.float32)
    l_i = tl.zeros([QP], tl.float32)
    acc = tl.zeros([RVC, QP], tl.float32)

    k_row = K + b * stride_kb + k_off
    v_row = V + b * stride_vb + v_off
    for n0 in range(lo, hi, BN):
        nn = n0 + tl.arange(0, BN)
        n_ok = nn < hi
        # -- K: rebuild the tile's keys from latents -------------------------------------------------
        if NRKC == 1:
            c = tl.load(
                k_row + nn[:, None] * stride_ks + rk[None, :],
                mask=n_ok[:, None] & (rk < k_wid)[None, :],
                other=0.0,
            )  # [BN, RKC]
            c = _dot_operand(c, CDT, DDT)
            k1 = tl.dot(c, u1)  # [BN, D2] fp32
            k2 = tl.dot(c, u2)
        else:
            k1 = tl.zeros([BN, D2], tl.float32)
            k2 = tl.zeros([BN, D2], tl.float32)
            # Only the chunks this head's group uses: ragged heads pay for their own rank.
            for kc in range(0, tl.cdiv(k_wid, RKC)):
                rkk = kc * RKC + rk
                c = tl.load(
                    k_row + nn[:, None] * stride_ks + rkk[None, :],
                    mask=n_ok[:, None] & (rkk < k_wid)[None, :],
                    other=0.0,
                )
                c = _dot_operand(c, CDT, DDT)
                u_ptr = KUP + j * stride_uh + rkk[:, None] * stride_ur + dd[None, :]
                k1 = tl.dot(c, _dot_operand(tl.load(u_ptr), CDT, DDT), k1)
                k2 = tl.dot(c, _dot_operand(tl.load(u_ptr + D2), CDT, DDT), k2)
        # Per-token factors: with a bias they must hit K before the bias; without one they factor out
        # of the score and cost one multiply per score instead of one per K element.
        if INT8:
            zk = tl.load(KSCALE + b * stride_zkb + nn * stride_zks + gk, mask=n_ok, other=0.0)
        if HAS_NORM:
            nt = tl.load(KNORM + b * stride_nb + nn * stride_ns + j * stride_nh, mask=n_ok, other=0.0)
        if HAS_BIAS:
            if INT8:
                k1 = k1 * zk[:, None]
                k2 = k2 * zk[:, None]
            k1 = k1 + kb1[None, :]
            k2 = k2 + kb2[None, :]
        # -- RoPE on the rebuilt keys ------------------------------------------------------------------
        if NPOS == 1:
            pos = tl.load(POS + b * stride_pb + nn * stride_ps, mask=n_ok, other=0)
            ang = pos.to(tl.float32)[:, None] * invf[None, :]  # [BN, D2]
        else:
            pos = tl.load(
                POS + b * stride_pb + nn[:, None] * stride_ps + sec[None, :], mask=n_ok[:, None], other=0
            )
            ang = pos.to(tl.float32) * invf[None, :]
        cs, sn = _sincos(ang, FAST_TRIG)
        r1 = k1 * cs - k2 * sn
        r2 = k2 * cs + k1 * sn
        # -- scores, transposed: [BN, QP] -----------------------------------------------------------
        st = tl.dot(_dot_operand(r1, CDT, DDT), q1t)
        st = tl.dot(_dot_operand(r2, CDT, DDT), q2t, st)
        if HAS_BIAS:
            if HAS_NORM:
                st = st * nt[:, None]
        else:
            if INT8:
                st = st * zk[:, None]
            if HAS_NORM:
                st = st * nt[:, None]
        st = tl.where(n_ok[:, None], st, float("-inf"))
        # -- online softmax (base 2) and latent-space V ---------------------------------------------
        m_new = tl.maximum(m_i, tl.max(st, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(st - m_new[None, :])  # [BN, QP]
        l_i = l_i * alpha + tl.sum(p, 0)
        cv = tl.load(
            v_row + nn[:, None] * stride_vs + rv[None, :], mask=n_ok[:, None] & rv_ok[None, :], other=0.0
        )  # [BN, RVC]
        if INT8:
            zv = tl.load(VSCALE + b * stride_zvb + nn * stride_zvs + gv, mask=n_ok, other=0.0)
            p = p * zv[:, None]
        acc = acc * alpha[None, :]
        acc = tl.dot(tl.trans(_dot_operand(cv, CDT, DDT)), _dot_operand(p, CDT, DDT), acc)  # [RVC, QP]
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[None, :]
    w_ok = q_ok[None, :] & (rv < out_width)[:, None]
    if DIRECT:
        o_ptr = OUT + b * stride_ob + heads[None, :] * stride_oh + rv[:, None]
        tl.store(o_ptr, o.to(OUT.dtype.element_ty), mask=w_ok)
    else:
        po_ptr = PO + b * stride_pob + heads[None, :] * stride_poh + split * stride_pos + rv[:, None]
        tl.store(po_ptr, o, mask=w_ok)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        # Every V chunk computes the same log-sum-exp; chunk 0 writes it.
        first = (qi * 0 + vc) == 0
        tl.store(PL + b * stride_plb + heads * stride_plh + split, lse, mask=q_ok & first)


@triton.jit
def _latent_decode_merge(
    PO,
    PL,
    OUT,
    num_heads,
    n_splits,
    out_width,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_ob,
    stride_oh,
    NSP: tl.constexpr,
    BR: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    s = tl.arange(0, NSP)
    s_ok = s < n_splits
    lse = tl.load(PL + b * stride_plb + h * stride_plh + s, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    wt = tl.exp2(lse - mx)  # empty splits (lse = -inf) weigh 0
    den = tl.sum(wt, 0)
    den = tl.where(den > 0.0, den, 1.0)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    r_ok = r < out_width
    po = tl.load(
        PO + b * stride_pob + h * stride_poh + s[:, None] * stride_pos + r[None, :],
        mask=s_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    o = tl.sum(po * wt[:, None], 0) / den
    tl.store(OUT + b * stride_ob + h * stride_oh + r, o.to(OUT.dtype.element_ty), mask=r_ok)


# -- launch configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and schedule of one launch. ``split_len`` 0 lets :func:`launch_config` choose."""

    block_n: int
    num_warps: int
    num_stages: int
    rank_chunk: int
    v_chunk: int
    split_len: int = 0


def _pow2(x: int) -> int:
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


def launch_config(
    batch: int, num_kv_heads: int, max_len: int, w: LatentWeights, device: torch.device
) -> LaunchConfig:
    """Block sizes from the table, split length so that the grid covers the GPU about four times."""
    kw, vw = w.k_layout.max_width, w.out_width
    # U_K,j stays in registers only up to 64 rows; wider ranks go in chunks of 64 (a [128, d] U in
    # registers spilled and ran 3.5x slower on an H200).
    rank_chunk = max(16, _pow2(kw)) if kw <= 64 else 64
    v_chunk = max(16, _pow2(vw)) if vw <= 128 else 256
    if device.type != "cuda":
        # The interpreter runs every program in Python: small tiles keep tests quick while still
        # exercising several tiles and splits per row.
        block_n, warps, stages = 16, 4, 1
    else:
        for k_max, v_max, cfg in _TABLE:
            if rank_chunk <= k_max and v_chunk <= v_max:
                block_n, warps, stages = cfg
                break
    split_len = _split_len(batch, num_kv_heads * triton.cdiv(vw, v_chunk), max_len, block_n, device)
    return LaunchConfig(block_n, warps, stages, rank_chunk, v_chunk, split_len)


def _split_len(batch: int, programs_per_row: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Tokens per split, a multiple of ``block_n``, so that the grid covers the GPU about four times
    over (rows × KV heads × V chunks × splits); long rows with many heads get one split each."""
    per_split = batch * programs_per_row
    target = 4 * _sm_count(device)
    n_splits = max(1, min(triton.cdiv(target, per_split), triton.cdiv(max(max_len, 1), block_n)))
    return triton.cdiv(triton.cdiv(max(max_len, 1), n_splits), block_n) * block_n


@dataclass(frozen=True)
class _Static:
    """The launch's static device tensors for one layer: layout tables, RoPE, bias, padded up-projection."""

    k_up: torch.Tensor
    k_off: torch.Tensor
    k_wid: torch.Tensor
    k_grp: torch.Tensor
    v_off: torch.Tensor
    v_wid: torch.Tensor
    v_grp: torch.Tensor
    inv_freq: torch.Tensor
    sec: torch.Tensor
    k_bias: torch.Tensor
    dummy: torch.Tensor


def _static(w: LatentWeights, rows: int, device: torch.device) -> _Static:
    """Built once per (device, padded rank) and kept on ``w``; rebuilt if ``k_up`` is replaced or edited."""
    key = (str(device), rows, w.k_up.data_ptr(), w.k_up._version)
    hit = w.launch_cache.get(key)
    if hit is not None:
        return hit
    k_up = w.k_up
    if k_up.shape[1] < rows:
        k_up = torch.nn.functional.pad(k_up, (0, 0, 0, rows - k_up.shape[1]))
    dummy = torch.zeros(1, device=device, dtype=torch.float32)
    st = _Static(
        k_up.contiguous(),
        *w.k_layout.tables(device),
        *w.v_layout.tables(device),
        w.rope.inv_freq.to(device=device, dtype=torch.float32).contiguous(),
        w.rope.section_index().to(device),
        w.k_bias.to(device=device, dtype=torch.float32).contiguous() if w.k_bias is not None else dummy,
        dummy,
    )
    w.launch_cache.clear()  # one entry: a layer runs at one padding on one device
    w.launch_cache[key] = st
    return st


def _workspace(shape: tuple[int, ...], poison: bool, device: torch.device) -> torch.Tensor:
    if poison:
        return torch.full(shape, float("nan"), device=device, dtype=torch.float32)
    return torch.empty(shape, device=device, dtype=torch.float32)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def latent_attention_decode(
    q: torch.Tensor,
    kv: LatentKV,
    w: LatentWeights,
    starts: torch.Tensor,
    ends: torch.Tensor,
    *,
    max_len: int | None = None,
    config: LaunchConfig | None = None,
    out: torch.Tensor | None = None,
    poison_workspace: bool = False,
) -> torch.Tensor:
    """One decode step on the GPU (or under ``TRITON_INTERPRET=1``): [B, H_q, out_width] in q's dtype.

    ``max_len`` bounds ``ends - starts`` (defaults to the cache capacity, which over-counts splits but
    never reads past ``ends``); passing it avoids sizing the grid for empty capacity. ``out`` receives
    the result if given. ``poison_workspace`` fills the split partials with NaN first (tests: an entry
    the merge reads but no split wrote then shows up as NaN).
    """
    b, hq, d = q.shape
    hkv = w.num_kv_heads
    qpk = w.queries_per_kv
    max_len = kv.k.shape[1] if max_len is None else max_len
    cfg = config or launch_config(b, hkv, max_len, w, q.device)
    if cfg.split_len == 0:
        programs = hkv * triton.cdiv(w.out_width, cfg.v_chunk)
        split = _split_len(b, programs, max_len, cfg.block_n, q.device)
        cfg = LaunchConfig(cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.rank_chunk, cfg.v_chunk, split)
    kw = w.k_layout.max_width
    n_rk = triton.cdiv(kw, cfg.rank_chunk)
    dev = q.device
    st = _static(w, max(w.k_up.shape[1], n_rk * cfg.rank_chunk), dev)
    k_up = st.k_up
    out_width = w.out_width
    n_vchunks = triton.cdiv(out_width, cfg.v_chunk)
    n_splits = max(1, triton.cdiv(max(max_len, 1), cfg.split_len))
    if out is None:
        out = torch.empty(b, hq, out_width, device=q.device, dtype=q.dtype)
    elif out.shape != (b, hq, out_width) or out.stride(2) != 1:
        raise ValueError(
            f"out must be [{b}, {hq}, {out_width}] with a contiguous last dim, got {tuple(out.shape)}"
        )
    direct = n_splits == 1
    if direct:
        po = st.dummy.view(1, 1, 1, 1)
        pl = st.dummy.view(1, 1, 1)
    else:
        po = _workspace((b, hq, n_splits, out_width), poison_workspace, q.device)
        pl = _workspace((b, hq, n_splits), poison_workspace, q.device)

    k_off, k_wid, k_grp = st.k_off, st.k_wid, st.k_grp
    v_off, v_wid, v_grp = st.v_off, st.v_wid, st.v_grp
    inv_freq, sec = st.inv_freq, st.sec
    dummy = st.dummy
    k_scale = kv.k_scale if kv.k_scale is not None else dummy.view(1, 1, 1)
    v_scale = kv.v_scale if kv.v_scale is not None else dummy.view(1, 1, 1)
    k_norm = kv.k_norm if kv.k_norm is not None else dummy.view(1, 1, 1)
    k_bias = st.k_bias
    norm_head_stride = k_norm.stride(2) if k_norm.shape[2] > 1 else 0
    cdt = _TL_DTYPES[k_up.dtype]
    # bf16 dots are broken in the Triton interpreter (elementwise bf16 is not); see _dot_operand.
    ddt = tl.float32 if (interpreting() and k_up.dtype == torch.bfloat16) else cdt
    q_scale = w.scale * LOG2E * w.rope.attention_factor
    qc = q.contiguous()

    grid = (n_splits, hkv * n_vchunks, b)
    _latent_decode_split[grid](
        qc,
        kv.k,
        kv.v,
        k_up,
        k_bias,
        kv.positions,
        sec,
        inv_freq,
        k_scale,
        v_scale,
        k_norm,
        k_off,
        k_wid,
        k_grp,
        v_off,
        v_wid,
        v_grp,
        starts,
        ends,
        po,
        pl,
        out,
        q_scale,
        cfg.split_len,
        n_vchunks,
        out_width,
        qc.stride(0),
        qc.stride(1),
        kv.k.stride(0),
        kv.k.stride(1),
        kv.v.stride(0),
        kv.v.stride(1),
        k_up.stride(0),
        k_up.stride(1),
        kv.positions.stride(0),
        kv.positions.stride(1),
        k_scale.stride(0),
        k_scale.stride(1),
        v_scale.stride(0),
        v_scale.stride(1),
        k_norm.stride(0),
        k_norm.stride(1),
        norm_head_stride,
        po.stride(0),
        po.stride(1),
        po.stride(2),
        pl.stride(0),
        pl.stride(1),
        out.stride(0),
        out.stride(1),
        QPK=qpk,
        QP=max(16, _pow2(qpk)),
        D2=d // 2,
        RKC=cfg.rank_chunk,
        NRKC=n_rk,
        RVC=cfg.v_chunk,
        BN=cfg.block_n,
        NPOS=w.rope.num_positions,
        INT8=kv.quantized,
        HAS_BIAS=w.k_bias is not None,
        HAS_NORM=kv.k_norm is not None,
        ALIGN_K=w.k_layout.align,
        ALIGN_V=w.v_layout.align,
        FAST_TRIG=q.is_cuda and not interpreting(),
        DIRECT=direct,
        CDT=cdt,
        DDT=ddt,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if not direct:
        br = min(128, max(16, _pow2(out_width)))
        _latent_decode_merge[(b * hq, triton.cdiv(out_width, br))](
            po,
            pl,
            out,
            hq,
            n_splits,
            out_width,
            po.stride(0),
            po.stride(1),
            po.stride(2),
            pl.stride(0),
            pl.stride(1),
            out.stride(0),
            out.stride(1),
            NSP=max(2, _pow2(n_splits)),
            BR=br,
        )
    return out
