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
The launch geometry is plain Python in :mod:`~lowrank_kit.kernels.latent_attention.launch`
(:func:`~lowrank_kit.kernels.latent_attention.launch.launch_config`: a small table keyed by shape), so the
first call compiles once and never autotunes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowrank_kit.kernels import interpreting
from lowrank_kit.kernels.latent_attention.launch import LaunchConfig, LaunchPlan, cdiv, plan_launch, pow2
from lowrank_kit.kernels.latent_attention.layout import LatentKV, LatentWeights

LOG2E = 1.4426950408889634


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
def _int8_to_f16(x):
    # Exact int8 → fp16 on the full-rate integer/fp16 units instead of I2F (a quarter-rate conversion
    # that shares its pipe with sin/cos/exp2): 0x6400 | (x + 128) is the fp16 number 1024 + (x + 128).
    u = x.to(tl.uint8, bitcast=True) ^ 0x80
    return (u.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1152.0


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

    invf0 = tl.load(INVF + dd)  # [D2] frequencies of position component 0 (zero where another rotates)
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
        # M-RoPE sums one product per position component (exact: the other components add zeros).
        p0 = tl.load(POS + b * stride_pb + nn * stride_ps, mask=n_ok, other=0).to(tl.float32)
        ang = p0[:, None] * invf0[None, :]  # [BN, D2]
        for cpn in tl.static_range(1, NPOS):
            pc = tl.load(POS + b * stride_pb + nn * stride_ps + cpn, mask=n_ok, other=0).to(tl.float32)
            ang += pc[:, None] * tl.load(INVF + cpn * D2 + dd)[None, :]
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
def _latent_decode_heads(
    Q,
    K,
    V,
    KUP,
    KBIAS,
    POS,
    INVF,
    KSCALE,
    VSCALE,
    KNORM,
    K_OFF,
    K_WID,
    V_OFF,
    V_WID,
    ORDER,
    BLK_HEAD,
    BLK_COUNT,
    STARTS,
    ENDS,
    PO,
    PL,
    OUT,
    q_scale,
    split_len,
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
    HB: tl.constexpr,
    HP: tl.constexpr,
    D2: tl.constexpr,
    RKB: tl.constexpr,
    RVB: tl.constexpr,
    OWP: tl.constexpr,
    BN: tl.constexpr,
    NPOS: tl.constexpr,
    INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    ALIGN_K: tl.constexpr,
    ALIGN_V: tl.constexpr,
    FAST_TRIG: tl.constexpr,
    DIRECT: tl.constexpr,
    LAT16: tl.constexpr,
    KDT: tl.constexpr,
    CDT: tl.constexpr,
    DDT: tl.constexpr,
):
    # Per-head latents, one query head per KV head (MHA): RoPE moves to the query side of the score.
    # With k = c·U (halves k1, k2 of U1, U2) and the rotate-half rotation by angles a_i,
    #   q·rope(k) = Σ_i cos a_i (q1_i k1_i + q2_i k2_i) + sin a_i (q2_i k1_i − q1_i k2_i)
    #             = Σ_r c_r · W_r,   W = cos(a) @ M1ᵀ + sin(a) @ M2ᵀ,
    # M1 = U1·q1 + U2·q2 and M2 = U1·q2 − U2·q1 ([rank, d/2], built once per program). So no key is
    # rebuilt or rotated: per token the kernel forms W on tensor cores from a cos/sin tile that all heads
    # of the program share, multiplies it into the latent elementwise, and sums each head's columns with a
    # 0/1 selector dot. RoPE's special-function work is paid once per token for the program's heads. A
    # program's heads are a run of heads adjacent in the cached row (BLK_HEAD, BLK_COUNT: positions in the
    # row order ORDER) packed up to a column budget, so ragged ranks fill programs instead of padding every
    # head to the widest; the runtime orders heads so that they pack well (layout.pack_order).
    split = tl.program_id(0)
    blk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    start = tl.load(STARTS + b)
    end = tl.load(ENDS + b)
    lo = start + split * split_len
    hi = tl.minimum(end, lo + split_len)

    i0 = tl.load(BLK_HEAD + blk)  # the program's first head in row order
    nh = tl.load(BLK_COUNT + blk)
    hh = tl.arange(0, HP)
    # HB bounds every program's head count at compile time: slots past it are known empty.
    h_ok = (hh < HB) & (hh < nh)
    # [HP] KV head (= query head) of each slot, through the row order; padding slots alias the first.
    jh = tl.load(ORDER + tl.where(h_ok, i0 + hh, i0))
    j0 = tl.load(ORDER + i0)
    k_offs = tl.load(K_OFF + jh)
    k_wids = tl.where(h_ok, tl.load(K_WID + jh), 0)
    v_offs = tl.load(V_OFF + jh)
    v_wids = tl.where(h_ok, tl.load(V_WID + jh), 0)
    # The block's heads sit side by side in a cached row, so its latents are one contiguous run of
    # k_cols (v_cols) columns. Bounding loads by that one aligned number (not per-column head maps) lets
    # the compiler prove 16-byte vectors, which the asynchronous copies of the software pipeline need.
    j_last = tl.load(ORDER + i0 + nh - 1)
    k_base = tl.multiple_of(tl.load(K_OFF + j0), ALIGN_K)
    v_base = tl.multiple_of(tl.load(V_OFF + j0), ALIGN_V)
    k_cols = tl.multiple_of(tl.load(K_OFF + j_last) + tl.load(K_WID + j_last) - k_base, ALIGN_K)
    v_cols = tl.multiple_of(tl.load(V_OFF + j_last) + tl.load(V_WID + j_last) - v_base, ALIGN_V)

    # -- column → head maps ------------------------------------------------------------------------------
    ck = tl.arange(0, RKB)
    col = k_base + ck
    in_k = (col[:, None] >= k_offs[None, :]) & (col[:, None] < (k_offs + k_wids)[None, :])  # [RKB, HP]
    in_ki = in_k.to(tl.int32)
    ck_ok = ck < k_cols
    ck_head = tl.sum(in_ki * jh[None, :], 1)  # [RKB]
    ck_row = col - tl.sum(in_ki * k_offs[None, :], 1)  # row of the head's U_K
    sel = in_k.to(KDT)  # [RKB, HP] sums each head's columns

    cv_ = tl.arange(0, RVB)
    colv = v_base + cv_
    in_v = (colv[:, None] >= v_offs[None, :]) & (colv[:, None] < (v_offs + v_wids)[None, :])  # [RVB, HP]
    cv_ok = cv_ < v_cols

    # -- M1ᵀ, M2ᵀ: [D2, RKB], the query folded into each column's up-projection row -----------------------
    dd = tl.arange(0, D2)
    q_ptr = Q + b * stride_qb + ck_head[:, None] * stride_qh + dd[None, :]
    q1 = tl.load(q_ptr, mask=ck_ok[:, None], other=0.0).to(tl.float32) * q_scale  # [RKB, D2]
    q2 = tl.load(q_ptr + D2, mask=ck_ok[:, None], other=0.0).to(tl.float32) * q_scale
    u_ptr = KUP + ck_head[:, None] * stride_uh + ck_row[:, None] * stride_ur + dd[None, :]
    u1 = tl.load(u_ptr, mask=ck_ok[:, None], other=0.0).to(tl.float32)
    u2 = tl.load(u_ptr + D2, mask=ck_ok[:, None], other=0.0).to(tl.float32)
    m1t = tl.trans(u1 * q1 + u2 * q2).to(KDT)
    m2t = tl.trans(u1 * q2 - u2 * q1).to(KDT)
    if HAS_BIAS:
        # The bias rotates like the latent part: its score is cos @ β1ᵀ + sin @ β2ᵀ, [BN, HP].
        qh_ptr = Q + b * stride_qb + jh[None, :] * stride_qh + dd[:, None]
        qh1 = tl.load(qh_ptr, mask=h_ok[None, :], other=0.0).to(tl.float32) * q_scale  # [D2, HP]
        qh2 = tl.load(qh_ptr + D2, mask=h_ok[None, :], other=0.0).to(tl.float32) * q_scale
        kb_ptr = KBIAS + jh[None, :] * 2 * D2 + dd[:, None]
        kb1 = tl.load(kb_ptr, mask=h_ok[None, :], other=0.0)
        kb2 = tl.load(kb_ptr + D2, mask=h_ok[None, :], other=0.0)
        beta1t = (qh1 * kb1 + qh2 * kb2).to(KDT)
        beta2t = (qh2 * kb1 - qh1 * kb2).to(KDT)
    invf0 = tl.load(INVF + dd)  # [D2] frequencies of position component 0 (zero where another rotates)

    m_i = tl.full([HP], float("-inf"), tl.float32)
    l_i = tl.zeros([HP], tl.float32)
    acc = tl.zeros([RVB, HP], tl.float32)

    k_row = K + b * stride_kb + k_base
    v_row = V + b * stride_vb + v_base
    pos_row = POS + b * stride_pb
    hk_ok = h_ok[None, :]
    for n0 in range(lo, hi, BN):
        nn = n0 + tl.arange(0, BN)
        n_ok = nn < hi
        # -- angles [BN, D2]; M-RoPE sums one product per component (exact: the others add zeros) -------
        # Past `hi` the positions index is clamped rather than masked: a mask shared with the [BN, HP]
        # score tiles gave this load their layout, in which each thread copied 32 positions one by one.
        pos_ptr = pos_row + tl.minimum(n0 + tl.arange(0, BN), hi - 1) * stride_ps
        p0 = tl.load(pos_ptr).to(tl.float32)
        ang = p0[:, None] * invf0[None, :]
        for cpn in tl.static_range(1, NPOS):
            pc = tl.load(pos_ptr + cpn).to(tl.float32)
            ang += pc[:, None] * tl.load(INVF + cpn * D2 + dd)[None, :]
        cs, sn = _sincos(ang, FAST_TRIG)
        cs = cs.to(KDT)
        sn = sn.to(KDT)
        # -- scores [BN, HP] ------------------------------------------------------------------------------
        wk = tl.dot(cs, m1t)
        wk = tl.dot(sn, m2t, wk)  # [BN, RKB] fp32
        c = tl.load(
            k_row + nn[:, None] * stride_ks + ck[None, :], mask=n_ok[:, None] & ck_ok[None, :], other=0.0
        )  # [BN, RKB]
        if LAT16:
            # fp16 (or int8) latents: one packed fp16 multiply per two columns.
            if INT8:
                c = _int8_to_f16(c)
            pk = c * wk.to(tl.float16)
        else:
            pk = (c.to(tl.float32) * wk).to(KDT)
        st = tl.dot(pk, sel)  # [BN, HP]
        nh_ok = n_ok[:, None] & hk_ok
        if INT8:
            zk = tl.load(
                KSCALE + b * stride_zkb + nn[:, None] * stride_zks + jh[None, :], mask=nh_ok, other=0.0
            )
            st = st * zk
        if HAS_BIAS:
            st = tl.dot(cs, beta1t, st)
            st = tl.dot(sn, beta2t, st)
        if HAS_NORM:
            nt = tl.load(
                KNORM + b * stride_nb + nn[:, None] * stride_ns + jh[None, :] * stride_nh,
                mask=nh_ok,
                other=0.0,
            )
            st = st * nt
        st = tl.where(n_ok[:, None], st, float("-inf"))
        # -- online softmax (base 2) and latent-space V ---------------------------------------------------
        m_new = tl.maximum(m_i, tl.max(st, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(st - m_new[None, :])  # [BN, HP]
        l_i = l_i * alpha + tl.sum(p, 0)
        cv = tl.load(
            v_row + nn[:, None] * stride_vs + cv_[None, :], mask=n_ok[:, None] & cv_ok[None, :], other=0.0
        )  # [BN, RVB]
        if INT8:
            zv = tl.load(
                VSCALE + b * stride_zvb + nn[:, None] * stride_zvs + jh[None, :], mask=nh_ok, other=0.0
            )
            p = p * zv
        acc = acc * alpha[None, :]
        # Every head's weights meet every column of the block; each head keeps only its own columns.
        if INT8:
            cv = _int8_to_f16(cv)
        acc = tl.dot(tl.trans(_dot_operand(cv, CDT, DDT)), _dot_operand(p, CDT, DDT), acc)  # [RVB, HP]
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[None, :]
    own = in_v & hk_ok
    rows = colv[:, None] - v_offs[None, :]  # [RVB, HP] column within the head's output
    zc = tl.arange(0, OWP)
    # Columns past a head's own V width up to the output width are zero (as for the grouped kernel).
    z_ok = (zc[:, None] >= v_wids[None, :]) & (zc[:, None] < out_width) & hk_ok
    zero = tl.zeros([OWP, HP], tl.float32)
    if DIRECT:
        o_ptr = OUT + b * stride_ob + jh[None, :] * stride_oh
        tl.store(o_ptr + rows, o.to(OUT.dtype.element_ty), mask=own)
        tl.store(o_ptr + zc[:, None], zero.to(OUT.dtype.element_ty), mask=z_ok)
    else:
        po_ptr = PO + b * stride_pob + jh[None, :] * stride_poh + split * stride_pos
        tl.store(po_ptr + rows, o, mask=own)
        tl.store(po_ptr + zc[:, None], zero, mask=z_ok)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(PL + b * stride_plb + jh * stride_plh + split, lse, mask=h_ok)


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


# -- launch ----------------------------------------------------------------------------------------------
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
    invf_by_component: torch.Tensor
    k_bias: torch.Tensor
    dummy: torch.Tensor
    order: torch.Tensor  # [groups] int32: the K groups in row order


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
        _invf_by_component(w).to(device),
        w.k_bias.to(device=device, dtype=torch.float32).contiguous() if w.k_bias is not None else dummy,
        dummy,
        torch.tensor(w.k_layout.order, dtype=torch.int32, device=device),
    )
    w.launch_cache.clear()  # one entry: a layer runs at one padding on one device
    w.launch_cache[key] = st
    return st


def _block_tables(
    w: LatentWeights, blocks: tuple[tuple[int, int], ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """First head and head count of each program's run, as int32 tensors on ``device`` (kept on ``w``)."""
    key = ("blocks", str(device), blocks)
    hit = w.launch_cache.get(key)
    if hit is None:
        first = torch.tensor([f for f, _ in blocks], dtype=torch.int32, device=device)
        count = torch.tensor([n for _, n in blocks], dtype=torch.int32, device=device)
        hit = w.launch_cache[key] = (first, count)
    return hit


def _invf_by_component(w: LatentWeights) -> torch.Tensor:
    """[num_positions, d/2] fp32: row c holds the frequencies that position component c rotates and zeros
    elsewhere, so an angle is Σ_c pos_c · row_c (one row without M-RoPE)."""
    invf = w.rope.inv_freq.float().cpu()
    sec = w.rope.section_index().long()
    comps = torch.arange(w.rope.num_positions)[:, None]
    return torch.where(sec[None, :] == comps, invf[None, :], torch.zeros(())).contiguous()


def _partials(
    plan: LaunchPlan, workspace: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split partials (outputs, log-sum-exps) of ``plan``: the caller's ``workspace`` once checked,
    else new buffers."""
    shape = plan.partials_shape
    if workspace is None:
        return (
            torch.empty(shape, device=device, dtype=torch.float32),
            torch.empty(shape[:3], device=device, dtype=torch.float32),
        )
    po, pl = workspace
    for t, want in ((po, shape), (pl, shape[:3])):
        if t.shape != want or t.dtype != torch.float32 or t.device != device or t.stride(-1) != 1:
            raise ValueError(
                f"workspace must be float32 {list(shape)} and {list(shape[:3])} on {device} with a "
                f"contiguous last dim (plan_launch's partials_shape), got {t.dtype} {list(t.shape)} on {t.device}"
            )
    return po, pl


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
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One decode step on the GPU (or under ``TRITON_INTERPRET=1``): [B, H_q, out_width] in q's dtype.

    ``max_len`` bounds ``ends - starts`` (defaults to the cache capacity, which over-counts splits but
    never reads past ``ends``); passing it avoids sizing the grid for empty capacity. ``config`` overrides
    the launch (its ``heads_per_program`` picks the kernel; > 0 needs
    :func:`~lowrank_kit.kernels.latent_attention.launch.uses_heads_kernel`). ``out`` receives the result
    if given. ``workspace`` holds the split partials if given: float32 outputs of
    :func:`~lowrank_kit.kernels.latent_attention.launch.plan_launch`'s ``partials_shape`` and log-sum-exps
    of its first three dims (unused when one split writes the output directly); else they are allocated.
    """
    b, hq, d = q.shape
    hkv = w.num_kv_heads
    max_len = kv.k.shape[1] if max_len is None else max_len
    plan = plan_launch(b, max_len, w, q.device, config)
    cfg, geo, n_vchunks = plan.config, plan.geometry, plan.n_vchunks
    split_len, n_splits = plan.split_len, plan.n_splits
    heads_kernel = geo is not None
    n_rk = 1 if heads_kernel else cdiv(w.k_layout.max_width, cfg.rank_chunk)
    rows = w.k_up.shape[1] if heads_kernel else max(w.k_up.shape[1], n_rk * cfg.rank_chunk)
    st = _static(w, rows, q.device)
    k_up = st.k_up
    out_width = w.out_width
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
        po, pl = _partials(plan, workspace, q.device)

    dummy = st.dummy
    k_scale = kv.k_scale if kv.k_scale is not None else dummy.view(1, 1, 1)
    v_scale = kv.v_scale if kv.v_scale is not None else dummy.view(1, 1, 1)
    k_norm = kv.k_norm if kv.k_norm is not None else dummy.view(1, 1, 1)
    norm_head_stride = k_norm.stride(2) if k_norm.shape[2] > 1 else 0
    cdt = _TL_DTYPES[k_up.dtype]
    # bf16 dots are broken in the Triton interpreter (elementwise bf16 is not); see _dot_operand.
    ddt = tl.float32 if (interpreting() and k_up.dtype == torch.bfloat16) else cdt
    q_scale = w.scale * LOG2E * w.rope.attention_factor
    qc = q.contiguous()
    strides = (
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
    )
    flags = dict(
        D2=d // 2,
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
    if cfg.maxnreg > 0 and q.is_cuda and not interpreting():
        flags["maxnreg"] = cfg.maxnreg
    if heads_kernel:
        # The query-side RoPE tiles (cos/sin, the folded up-projections, the per-column products) are
        # fp16 dot operands whatever the 16-bit cache dtype (HF itself casts cos/sin to the model
        # dtype); fp32 models keep fp32 throughout.
        k16 = k_up.dtype != torch.float32
        _latent_decode_heads[(n_splits, len(geo.blocks), b)](
            qc,
            kv.k,
            kv.v,
            k_up,
            st.k_bias,
            kv.positions,
            st.invf_by_component,
            k_scale,
            v_scale,
            k_norm,
            st.k_off,
            st.k_wid,
            st.v_off,
            st.v_wid,
            st.order,
            *_block_tables(w, geo.blocks, q.device),
            starts,
            ends,
            po,
            pl,
            out,
            q_scale,
            split_len,
            out_width,
            *strides,
            HB=geo.heads,
            HP=max(16, pow2(geo.heads)),
            RKB=geo.k_columns,
            RVB=geo.v_columns,
            OWP=max(16, pow2(out_width)),
            KDT=tl.float16 if k16 else tl.float32,
            LAT16=k16 and kv.k.dtype in (torch.float16, torch.int8),
            **flags,
        )
    else:
        _latent_decode_split[(n_splits, hkv * n_vchunks, b)](
            qc,
            kv.k,
            kv.v,
            k_up,
            st.k_bias,
            kv.positions,
            st.invf_by_component,
            k_scale,
            v_scale,
            k_norm,
            st.k_off,
            st.k_wid,
            st.k_grp,
            st.v_off,
            st.v_wid,
            st.v_grp,
            starts,
            ends,
            po,
            pl,
            out,
            q_scale,
            split_len,
            n_vchunks,
            out_width,
            *strides,
            QPK=w.queries_per_kv,
            QP=max(16, pow2(w.queries_per_kv)),
            RKC=cfg.rank_chunk,
            NRKC=n_rk,
            RVC=cfg.v_chunk,
            **flags,
        )
    if not direct:
        br = min(128, max(16, pow2(out_width)))
        _latent_decode_merge[(b * hq, cdiv(out_width, br))](
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
            NSP=max(2, pow2(n_splits)),
            BR=br,
        )
    return out
