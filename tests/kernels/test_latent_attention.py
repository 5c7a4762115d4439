"""Latent-attention decode: the Triton kernel against its naive twin (under TRITON_INTERPRET=1 on a
machine without a GPU), the naive twin against dense attention, layouts, int8 latents and input errors.

Shapes are chosen to break lazy kernels: sequence lengths 1, 63 and 1000, ranks 17 and 48 mixed across
heads, GQA 7:1 and 4:1, rows of different lengths with left padding, M-RoPE, int8 latents, shared and
grouped latents. Every output buffer (and every split partial) starts as NaN.
"""

import dataclasses
import subprocess
import sys

import pytest
import torch

from lowrank_kit.errors import LowRankError
from lowrank_kit.kernels.latent_attention import (
    LatentKV,
    LatentLayout,
    LatentWeights,
    RopeSpec,
    check_compiled,
    latent_attention_decode,
    naive,
    quantize_int8,
)
from lowrank_kit.kernels.latent_attention.launch import (
    LaunchConfig,
    head_blocks,
    head_geometry,
    heads_launch_config,
    launch_config,
    plan_launch,
    row_widths,
)
from lowrank_kit.kernels.latent_attention.layout import pack_order
from lowrank_kit.kernels.latent_attention.testing import (
    make_problem,
    relative_error,
    rope_inv_freq,
    run_poisoned,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative-error tolerances against the fp32 reference computed from the same cached latents:
# fp16: K, scores and probabilities are rounded to fp16 (11-bit mantissa) before the dots, measured ~5e-4.
# bf16: the same roundings with an 8-bit mantissa, measured ~1.3e-2.
# fp32: exact fp32 arithmetic under the interpreter; on a GPU the dots run in tf32 (10-bit mantissa).
TOL = {
    torch.float16: 3e-3,
    torch.bfloat16: 4e-2,
    torch.float32: 5e-3 if DEVICE == "cuda" else 1e-5,
}


def run_both(p):
    return run_poisoned(p), naive.latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends)


CASES = {
    "len1": dict(num_heads=4, num_kv_heads=2, k_ranks=(17, 48), v_ranks=(48, 17), lengths=(1, 1)),
    "len63_gqa7_leftpad": dict(
        num_heads=14, num_kv_heads=2, k_ranks=(17, 48), v_ranks=(24, 17), lengths=(63, 40), left_pad=(0, 9)
    ),
    "len1000_gqa4": dict(
        num_heads=4, num_kv_heads=1, k_ranks=(17,), v_ranks=(16,), lengths=(1000, 611), left_pad=(0, 300)
    ),
    "int8_bias_gqa4": dict(
        batch=3,
        num_heads=8,
        num_kv_heads=2,
        k_ranks=(17, 48),
        v_ranks=(48, 17),
        lengths=(63, 1, 30),
        left_pad=(0, 5, 2),
        int8=True,
        bias=True,
    ),
    "mrope_bias_gqa7": dict(
        num_heads=14,
        num_kv_heads=2,
        k_ranks=(48, 17),
        v_ranks=(17, 48),
        lengths=(63, 20),
        left_pad=(0, 3),
        bias=True,
        mrope_section=(4, 6, 6),
    ),
    "bf16": dict(
        num_heads=4,
        num_kv_heads=2,
        k_ranks=(17, 48),
        v_ranks=(48, 17),
        lengths=(63, 17),
        dtype=torch.bfloat16,
    ),
    "fp32": dict(
        num_heads=4, num_kv_heads=2, k_ranks=(17, 48), v_ranks=(48, 17), lengths=(63, 17), dtype=torch.float32
    ),
    "qknorm_per_head_int8": dict(
        num_heads=4,
        num_kv_heads=2,
        k_ranks=(17, 48),
        v_ranks=(48, 17),
        lengths=(63, 33),
        int8=True,
        bias=True,
        qk_norm="per_head",
    ),
    "qknorm_full": dict(
        num_heads=4, num_kv_heads=2, k_ranks=(48, 17), v_ranks=(17, 17), lengths=(40, 63), qk_norm="full"
    ),
    "shared": dict(
        num_heads=4,
        num_kv_heads=2,
        k_ranks=(40,),
        v_ranks=(33,),
        lengths=(63, 21),
        layout="shared",
        bias=True,
    ),
    "shared_wide_chunked": dict(
        num_heads=2, num_kv_heads=2, k_ranks=(200,), v_ranks=(300,), lengths=(37, 20), layout="shared"
    ),
    # Per-head ranks past one 64-wide chunk: each head loops over only the chunks its own rank needs.
    "ragged_wide_chunks": dict(
        num_heads=6, num_kv_heads=3, k_ranks=(17, 100, 130), v_ranks=(90, 8, 65), lengths=(45, 20), int8=True
    ),
    "grouped": dict(
        num_heads=8,
        num_kv_heads=4,
        k_ranks=(24, 17),
        v_ranks=(17, 48),
        lengths=(63, 50),
        layout="grouped",
        heads_per_group=2,
        int8=True,
    ),
    "empty_row": dict(num_heads=4, num_kv_heads=2, k_ranks=(17, 48), v_ranks=(48, 17), lengths=(0, 20)),
    # Per-head latents with one query head per KV head run on the per-head kernel (RoPE on the query
    # side, several heads a program). Three heads: the last program of two-head blocks holds one head.
    "heads_len1000_leftpad": dict(
        num_heads=3,
        num_kv_heads=3,
        k_ranks=(17, 48, 8),
        v_ranks=(48, 17, 24),
        lengths=(1000, 63),
        left_pad=(0, 300),
    ),
    "heads_len1": dict(num_heads=3, num_kv_heads=3, k_ranks=(17, 48, 8), v_ranks=(8, 17, 48), lengths=(1, 1)),
    "heads_int8_bias": dict(
        batch=3,
        num_heads=3,
        num_kv_heads=3,
        k_ranks=(17, 48, 8),
        v_ranks=(48, 17, 24),
        lengths=(63, 1, 30),
        left_pad=(0, 5, 2),
        int8=True,
        bias=True,
    ),
    "heads_mrope_bias_qknorm": dict(
        num_heads=4,
        num_kv_heads=4,
        k_ranks=(17, 48, 8, 33),
        v_ranks=(48, 17, 24, 9),
        lengths=(63, 20),
        left_pad=(0, 3),
        bias=True,
        mrope_section=(4, 6, 6),
        qk_norm="per_head",
    ),
    "heads_full_norm_int8": dict(
        num_heads=2,
        num_kv_heads=2,
        k_ranks=(48, 17),
        v_ranks=(17, 17),
        lengths=(40, 63),
        qk_norm="full",
        int8=True,
    ),
    "heads_bf16": dict(
        num_heads=2,
        num_kv_heads=2,
        k_ranks=(17, 48),
        v_ranks=(48, 17),
        lengths=(63, 17),
        dtype=torch.bfloat16,
    ),
    "heads_fp32": dict(
        num_heads=2, num_kv_heads=2, k_ranks=(17, 48), v_ranks=(48, 17), lengths=(63, 17), dtype=torch.float32
    ),
    "heads_int8_fp32_model": dict(
        num_heads=2,
        num_kv_heads=2,
        k_ranks=(17, 48),
        v_ranks=(48, 17),
        lengths=(63, 17),
        dtype=torch.float32,
        int8=True,
        bias=True,
    ),
    "heads_empty_row": dict(num_heads=2, num_kv_heads=2, k_ranks=(17, 48), v_ranks=(48, 17), lengths=(0, 20)),
    # Heads wider than 64 and 128 columns: one head a program, up to 256 columns.
    "heads_wide_ragged": dict(
        num_heads=3, num_kv_heads=3, k_ranks=(17, 100, 130), v_ranks=(90, 8, 65), lengths=(45, 20), int8=True
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_naive(name):
    spec = {"batch": 2, "head_dim": 32, "dtype": torch.float16, **CASES[name]}
    # Fresh inputs per check (the kernel must compute the same function on any input): positions as in
    # generation (slot minus left padding), then random up to 30000 (large angles, unrelated to slots).
    for seed, positions in ((0, "sequential"), (1, "random")):
        p = make_problem(seed=seed, positions=positions, device=DEVICE, **spec)
        out, ref = run_both(p)
        assert torch.isfinite(out).all(), f"{name}: unwritten (NaN) or non-finite outputs"
        err = relative_error(out, ref)
        assert err < TOL[spec["dtype"]], f"{name} seed {seed}: relative error {err:.2e}"


def test_empty_row_is_zero_and_padding_columns_are_zero():
    p = make_problem(
        batch=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        k_ranks=(17, 48),
        v_ranks=(48, 17),
        lengths=(0, 20),
        device=DEVICE,
    )
    out, _ = run_both(p)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    # KV head 1's V group is 17 wide (24 packed); its query heads 2, 3 have zeros past column 24.
    assert torch.equal(out[1, 2:, 24:], torch.zeros_like(out[1, 2:, 24:]))
    assert out[1, 2:, :17].abs().sum() > 0


def test_split_count_does_not_change_the_result():
    from lowrank_kit.kernels.latent_attention import triton as triton_impl

    p = make_problem(
        batch=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        k_ranks=(17, 48),
        v_ranks=(48, 17),
        lengths=(200, 150),
        device=DEVICE,
    )
    base = launch_config(2, 2, p.max_len, p.w, p.q.device)
    outs = []
    for split_len in (base.block_n, 4 * base.block_n, 256):  # many splits, a few, one (direct write)
        cfg = LaunchConfig(
            base.block_n, base.num_warps, base.num_stages, base.rank_chunk, base.v_chunk, split_len
        )
        outs.append(triton_impl.latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends, config=cfg).float())
    # Splits change only the order of fp32 accumulation (and one fp16 rounding of the output).
    assert relative_error(outs[0], outs[2]) < 2e-3
    assert relative_error(outs[1], outs[2]) < 2e-3


def test_kernel_choice_follows_the_layout():
    def cfg(**kw):
        spec = dict(batch=2, head_dim=32, lengths=(5, 3), **kw)
        p = make_problem(**spec)
        return launch_config(2, p.w.num_kv_heads, p.max_len, p.w, p.q.device)

    # Per-head latents, MHA: the per-head kernel.
    assert cfg(num_heads=4, num_kv_heads=4, k_ranks=(17, 48, 8, 8), v_ranks=(8,) * 4).heads_per_program > 0
    assert cfg(num_heads=2, num_kv_heads=2, k_ranks=(100, 8), v_ranks=(8, 8)).heads_per_program > 0
    # GQA, shared and grouped latents: the grouped kernel.
    assert cfg(num_heads=4, num_kv_heads=2, k_ranks=(17, 48), v_ranks=(48, 17)).heads_per_program == 0
    assert (
        cfg(num_heads=2, num_kv_heads=2, k_ranks=(40,), v_ranks=(33,), layout="shared").heads_per_program == 0
    )
    grouped = dict(k_ranks=(24, 17), v_ranks=(17, 48), layout="grouped", heads_per_group=2)
    assert cfg(num_heads=4, num_kv_heads=4, **grouped).heads_per_program == 0


def test_head_blocks_pack_consecutive_heads_into_the_column_budget():
    # Uniform rank 64 (ρ2 = 0.5 at d = 128): two heads a program.
    assert head_blocks((64,) * 6, (64,) * 6, 128, 16) == ((0, 2), (2, 2), (4, 2))
    # Ragged: a block grows while both its K and its V latents fit; a head wider than the budget is alone.
    assert head_blocks((24, 48, 8, 136, 64, 64), (8, 8, 120, 8, 8, 72), 128, 16) == (
        (0, 2),
        (2, 1),
        (3, 1),
        (4, 2),
    )
    # The head cap closes a block before the columns run out.
    assert head_blocks((8,) * 5, (8,) * 5, 128, 2) == ((0, 2), (2, 2), (4, 1))
    assert head_blocks((8,) * 20, (8,) * 20, 128, 16) == ((0, 16), (16, 4))


def test_pack_order_packs_ragged_heads_into_fewer_programs():
    # Uniform widths keep the head order (pairs of adjacent heads, as before).
    assert pack_order((64,) * 6, (64,) * 6) == tuple(range(6))
    k, v = (104, 64, 24, 64, 96, 32), (24, 64, 104, 64, 32, 96)
    assert len(head_blocks(k, v, 128, 16)) == 5  # only heads 4 and 5 fit together in index order
    order = pack_order(k, v)
    assert order == (0, 2, 4, 5, 1, 3)
    blocks = head_blocks(tuple(k[j] for j in order), tuple(v[j] for j in order), 128, 16)
    assert blocks == ((0, 2), (2, 2), (4, 2))  # the kernel's greedy runs over the packed order: its bins
    for first, n in blocks:
        heads = order[first : first + n]
        assert sum(k[j] for j in heads) <= 128 and sum(v[j] for j in heads) <= 128
    # The layout places groups in that order; packing and unpacking stay exact.
    lay = LatentLayout.per_head((100, 20, 90), 4, order=(2, 0, 1))
    assert lay.offsets == (92, 192, 0) and lay.row_width == 224
    x = torch.randn(3, 210)
    packed = lay.pack(x)
    assert torch.equal(packed[:, lay.packed_columns()], x)
    assert torch.equal(packed[:, :90], x[:, 120:])
    with pytest.raises(ValueError, match="must list every group"):
        LatentLayout.per_head((8, 8), 8, order=(0, 0))


@pytest.mark.parametrize("int8", [False, True])
def test_heads_kernel_on_packed_head_order(int8):
    """Ragged heads in the runtime's packed row order: programs of non-adjacent heads (by index), several
    heads a program, against the naive twin, which reads the same layout through its offsets."""
    p = make_problem(
        batch=2,
        num_heads=6,
        num_kv_heads=6,
        head_dim=32,
        k_ranks=(100, 60, 20, 60, 90, 30),
        v_ranks=(20, 60, 100, 60, 30, 90),
        lengths=(70, 33),
        left_pad=(0, 11),
        int8=int8,
        bias=True,
        head_order="packed",
        device=DEVICE,
    )
    assert p.w.k_layout.order != tuple(range(6)) and p.w.k_layout.order == p.w.v_layout.order
    base = heads_launch_config(2, p.max_len, p.w, p.q.device)
    geo = head_geometry(*row_widths(p.w), base.columns, base.heads_per_program)
    index = head_blocks(p.w.k_layout.widths, p.w.v_layout.widths, base.columns, 16)
    # fp16 (widths rounded to 8): 3 programs instead of 5; int8 (to 16): 4 instead of 5.
    assert (len(geo.blocks), len(index)) == ((4, 5) if int8 else (3, 5))
    ref = naive.latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends)
    for split_len in (base.block_n, 256):
        cfg = dataclasses.replace(base, split_len=split_len)
        out = run_poisoned(p, cfg)
        assert torch.isfinite(out).all()
        err = relative_error(out, ref)
        assert err < TOL[torch.float16], f"split {split_len}: {err:.2e}"


@pytest.mark.parametrize("heads_per_program", [1, 2, 4])
def test_heads_per_program_does_not_change_the_result(heads_per_program):
    """Every run length computes the same function: 5 heads leave a shorter last run for 2 and 4."""
    p = make_problem(
        batch=2,
        num_heads=5,
        num_kv_heads=5,
        head_dim=32,
        k_ranks=(17, 48, 8, 33, 64),
        v_ranks=(48, 17, 24, 9, 16),
        lengths=(70, 33),
        left_pad=(0, 11),
        int8=True,
        bias=True,
        qk_norm="per_head",
        device=DEVICE,
    )
    base = heads_launch_config(2, p.max_len, p.w, p.q.device, heads_per_program)
    assert base.heads_per_program == heads_per_program
    ref = naive.latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends)
    for split_len in (base.block_n, 256):  # several splits (merge pass) and one (direct write)
        cfg = dataclasses.replace(base, split_len=split_len)
        out = run_poisoned(p, cfg)
        assert torch.isfinite(out).all()
        err = relative_error(out, ref)
        assert err < TOL[torch.float16], f"heads_per_program {heads_per_program} split {split_len}: {err:.2e}"
        # Columns past each head's own V width are written as zeros, not left unwritten.
        assert torch.equal(out[:, 4, 16:], torch.zeros_like(out[:, 4, 16:]))


def test_heads_kernel_refuses_layouts_it_does_not_serve():
    from lowrank_kit.kernels.latent_attention import triton as triton_impl

    p = make_problem(
        batch=2, num_heads=4, num_kv_heads=2, head_dim=32, k_ranks=(17, 48), v_ranks=(48, 17), lengths=(5, 3)
    )
    cfg = LaunchConfig(16, 4, 1, 0, 0, 0, 2)
    with pytest.raises(
        ValueError, match="heads_per_program > 0 needs per-head K and V latents and one query"
    ):
        triton_impl.latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends, config=cfg)


def _split_problem(num_heads: int = 4):
    """Two KV heads (GQA 2:1, or MHA for 2 query heads) over rows of 70 and 33 tokens: with 16-token
    splits, 5 splits a row, 2 of them empty in row 1."""
    return make_problem(
        batch=2, num_heads=num_heads, num_kv_heads=2, head_dim=32, k_ranks=(17, 48), v_ranks=(48, 17),
        lengths=(70, 33), device=DEVICE,
    )  # fmt: skip


def test_workspace_is_the_callers_and_must_fit_the_plan():
    from lowrank_kit.kernels.latent_attention import triton as triton_impl

    p = _split_problem()
    cfg = dataclasses.replace(launch_config(2, 2, p.max_len, p.w, p.q.device), split_len=16)
    plan = plan_launch(2, p.max_len, p.w, p.q.device, cfg)
    assert plan.n_splits == 5 and plan.partials_shape == (2, 4, 5, p.w.out_width)
    po = torch.full(plan.partials_shape, float("nan"), device=DEVICE)
    pl = torch.full(plan.partials_shape[:3], float("nan"), device=DEVICE)

    def decode(**kw):
        return triton_impl.latent_attention_decode(
            p.q, p.kv, p.w, p.starts, p.ends, max_len=p.max_len, config=cfg, **kw
        )

    out = decode(workspace=(po, pl))
    assert torch.equal(out, decode())
    # Every split wrote its partials, empty ones included (zeros and a -inf log-sum-exp).
    assert not po.isnan().any() and not pl.isnan().any()
    assert torch.equal(pl[1, :, 3:], torch.full_like(pl[1, :, 3:], float("-inf")))
    shapes = rf"float32 \[2, 4, 5, {p.w.out_width}\] and \[2, 4, 5\] on {p.q.device}"
    with pytest.raises(ValueError, match=rf"workspace must be {shapes} .*, got torch.float32 \[2, 4, 4, "):
        decode(workspace=(po[:, :, :4], pl))
    with pytest.raises(ValueError, match=rf"workspace must be {shapes} .*, got torch.float16 \[2, 4, 5\]"):
        decode(workspace=(po, pl.half()))


class _WritesNothing:
    """Launched like a Triton kernel (``kernel[grid](...)``), and writes nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("split_len", [16, 256])
@pytest.mark.parametrize("num_heads", [4, 2])
def test_an_unwritten_output_fails_the_check(monkeypatch, split_len, num_heads):
    """The check is able to fail: with pass 1 skipped, the merge reads the NaN partials (5 splits) or the
    output keeps its NaN (one split, written directly), for the grouped kernel (GQA) and the per-head one."""
    from lowrank_kit.kernels.latent_attention import triton as triton_impl

    p = _split_problem(num_heads)
    cfg = dataclasses.replace(launch_config(2, 2, p.max_len, p.w, p.q.device), split_len=split_len)
    assert (cfg.heads_per_program > 0) == (num_heads == 2)
    ref = naive.latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends)
    assert relative_error(run_poisoned(p, cfg), ref) < TOL[torch.float16]
    monkeypatch.setattr(triton_impl, "_latent_decode_split", _WritesNothing())
    monkeypatch.setattr(triton_impl, "_latent_decode_heads", _WritesNothing())
    out = run_poisoned(p, cfg)
    assert out.isnan().all()
    assert relative_error(out, ref) == float("inf")


def test_launch_geometry_imports_without_triton():
    code = (
        "import sys, lowrank_kit.kernels.latent_attention.launch, lowrank_kit.kernels.latent_attention.testing; "
        "assert 'triton' not in sys.modules, 'triton was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * torch.cat([cos, cos], -1) + rot * torch.cat([sin, sin], -1)


def test_naive_matches_dense_attention_on_rebuilt_keys_and_values():
    """The twin's definition, checked against attention written out head by head from dense K and V."""
    torch.manual_seed(0)
    b, hq, hkv, d, s = 2, 6, 2, 16, 9
    k_ranks, v_ranks = (5, 7), (3, 8)
    kl, vl = LatentLayout.per_head(k_ranks, 4), LatentLayout.per_head(v_ranks, 4)
    uk = [torch.randn(r, d, dtype=torch.float64) for r in k_ranks]
    uv = [torch.randn(r, d, dtype=torch.float64) for r in v_ranks]
    bias = torch.randn(hkv, d, dtype=torch.float64)
    rope = RopeSpec(rope_inv_freq(d), 1.3, (2, 3, 3))
    w = LatentWeights(kl, vl, kl.up_rows(uk).float(), rope, hq, 0.37, bias.float(), "per_head")
    ck = [torch.randn(b, s, r, dtype=torch.float64) for r in k_ranks]
    cv = [torch.randn(b, s, r, dtype=torch.float64) for r in v_ranks]
    pos = torch.randint(0, 100, (b, s, 3), dtype=torch.int32)
    norm = torch.rand(b, s, hkv) + 0.5
    kv = LatentKV(kl.pack(torch.cat(ck, -1)).float(), vl.pack(torch.cat(cv, -1)).float(), pos, k_norm=norm)
    q = torch.randn(b, hq, d)
    starts, ends = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([9, 7], dtype=torch.int32)
    out = naive.latent_attention_decode(q, kv, w, starts, ends)

    sec = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    for bi in range(b):
        lo, hi = int(starts[bi]), int(ends[bi])
        ang = pos[bi, lo:hi][:, sec].double() * rope.inv_freq.double()
        cos, sin = ang.cos() * 1.3, ang.sin() * 1.3
        for h in range(hq):
            j = h // (hq // hkv)
            k = (ck[j][bi, lo:hi] @ uk[j] + bias[j]) * norm[bi, lo:hi, j, None].double()
            k = _rotate(k, cos, sin)
            p = torch.softmax((k @ q[bi, h].double()) * 0.37, dim=0)
            dense = p @ (cv[j][bi, lo:hi] @ uv[j])
            from_latent = out[bi, h, : v_ranks[j]].double() @ uv[j]
            assert torch.allclose(from_latent, dense, rtol=1e-4, atol=1e-4)  # fp32 twin vs fp64 here


def test_layout_widths_offsets_and_packing():
    lay = LatentLayout.per_head((17, 48, 5), align=8)
    assert lay.widths == (24, 48, 8)
    assert lay.offsets == (0, 24, 72)
    assert lay.row_width == 80  # 80 = Σ widths rounded up to 16 elements
    x = torch.arange(1, 71, dtype=torch.float32)[None]
    packed = lay.pack(x)
    assert torch.equal(packed[0, :17], x[0, :17])
    assert torch.equal(packed[0, 24:72], x[0, 17:65])
    assert torch.equal(packed[0, 72:77], x[0, 65:70])
    assert packed[0, 17:24].abs().sum() == 0 and packed[0, 77:].abs().sum() == 0
    shared = LatentLayout.shared(40, 4, 8)
    assert shared.head_group == (0, 0, 0, 0) and shared.row_width == 48
    grouped = LatentLayout.grouped((8, 16), 2, 8)
    assert grouped.head_group == (0, 0, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ranks=(4, 0), head_group=(0, 1)), "rank >= 1"),
        (dict(ranks=(4,), head_group=(0, 1)), "must name groups 0..0"),
        (dict(ranks=(4,), head_group=(0,), align=0), "align must be at least 1"),
    ],
)
def test_layout_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentLayout(**kwargs)


def test_pack_and_up_rows_reject_wrong_shapes():
    lay = LatentLayout.per_head((3, 5), 4)
    with pytest.raises(ValueError, match="expects Σ ranks = 8"):
        lay.pack(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="expected \\(5, 16\\)"):
        lay.up_rows([torch.zeros(3, 16), torch.zeros(4, 16)])


def test_int8_quantization_is_per_token_and_group():
    lay = LatentLayout.per_head((17, 48), 16)
    x = lay.pack(torch.randn(3, 5, 65) * torch.tensor([0.01] * 17 + [10.0] * 48))
    x[0, 0] = 0.0  # an all-zero token keeps finite scales
    q, s = quantize_int8(x, lay)
    assert q.dtype == torch.int8 and s.shape == (3, 5, 2)
    deq = torch.cat([q[..., :32].float() * s[..., :1], q[..., 32:].float() * s[..., 1:]], -1)
    # Symmetric rounding: every element within half a step of its group's scale.
    step = torch.cat([s[..., :1].expand(-1, -1, 32), s[..., 1:].expand(-1, -1, 48)], -1)
    assert ((deq - x).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(s[0, 0], torch.ones(2))
    # The small group's scale is not dragged up by the large one (token (0, 0) is the zero token).
    assert s[1:, :, 0].max() < 0.001 and s[0, 1:, 0].max() < 0.001


def test_rope_spec_rejects_sections_that_do_not_cover_the_frequencies():
    with pytest.raises(ValueError, match="sums to 15"):
        RopeSpec(rope_inv_freq(32), 1.0, (4, 5, 6))


def _problem():
    return make_problem(
        batch=2, num_heads=4, num_kv_heads=2, head_dim=32, k_ranks=(17, 48), v_ranks=(48, 17), lengths=(5, 3)
    )


def _mutate(p, what):
    kv = p.kv
    if what == "q_rank":
        p.q = p.q[0]
    elif what == "q_heads":
        p.q = torch.zeros(2, 3, 32, dtype=torch.float16)
    elif what == "k_dtype":
        kv.k = kv.k.to(torch.float64)
    elif what == "k_width":
        kv.k = kv.k[:, :, :-16]
    elif what == "mixed_int8":
        kv.k = kv.k.to(torch.int8)
    elif what == "scale_on_fp16":
        kv.k_scale = torch.ones(2, 5, 2)
    elif what == "dtype_mismatch":
        kv.k, kv.v = kv.k.float(), kv.v.float()
    elif what == "positions":
        kv.positions = kv.positions.long()
    elif what == "norm_missing":
        p.w.qk_norm = "full"
    elif what == "starts":
        p.starts = p.starts.long()
    return p


@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("q_rank", "q must be \\[batch, query heads, head_dim\\]"),
        ("q_heads", "q has 3 heads of dim 32; the layer has 4 query heads"),
        ("k_dtype", "k latents have dtype torch.float64; supported: float16, bfloat16, float32, int8"),
        ("k_width", "k latents have shape \\(2, 5, 64\\); expected \\[2, capacity, 80\\]"),
        ("mixed_int8", "k and v latents must both be int8 or neither"),
        ("scale_on_fp16", "only int8 latents take scales"),
        ("dtype_mismatch", "latents are torch.float32 but the up-projections are torch.float16"),
        ("positions", "positions have shape .* and dtype torch.int64; expected \\[2, 5, 1\\] int32"),
        ("norm_missing", "qk_norm='full' but k_norm was not given"),
        ("starts", "starts must be \\[2\\] int32"),
    ],
)
def test_decode_input_errors(what, match):
    p = _mutate(_problem(), what)
    with pytest.raises(LowRankError, match=match):
        latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends, backend="naive")


def test_int8_without_scales_is_an_error():
    p = make_problem(
        batch=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        k_ranks=(17, 48),
        v_ranks=(48, 17),
        lengths=(5, 3),
        int8=True,
    )
    p.kv.v_scale = None
    with pytest.raises(LowRankError, match="int8 latents need v_scale \\[batch, capacity, 2\\] fp32"):
        latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends)


def test_unknown_backend_and_triton_without_gpu_or_interpreter(monkeypatch):
    p = _problem()
    with pytest.raises(
        LowRankError, match="unknown latent-attention backend 'cuda'; available: auto, naive, triton"
    ):
        latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        LowRankError, match="the triton backend needs CUDA tensors \\(got cpu\\) or TRITON_INTERPRET=1"
    ):
        latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends, backend="triton")


def test_compiled_kernel_needs_head_dim_32():
    with pytest.raises(LowRankError, match=r"needs head_dim >= 32 .*got head_dim 16; use backend='naive'"):
        check_compiled(16)
    check_compiled(32)
    check_compiled(128)


def test_weights_validation():
    kl = LatentLayout.per_head((8, 8), 8)
    rope = RopeSpec(rope_inv_freq(32))
    up = torch.zeros(2, 8, 32)
    with pytest.raises(ValueError, match="5 query heads is not a multiple of 2 KV heads"):
        LatentWeights(kl, kl, up, rope, 5, 0.1)
    with pytest.raises(ValueError, match="head_dim 32 needs 16"):
        LatentWeights(kl, kl, up, RopeSpec(rope_inv_freq(16)), 4, 0.1)
    with pytest.raises(ValueError, match="qk_norm must be None, 'per_head' or 'full'"):
        LatentWeights(kl, kl, up, rope, 4, 0.1, qk_norm="rms")


def test_importing_the_package_does_not_import_triton():
    code = (
        "import sys, lowrank_kit, lowrank_kit.kernels.latent_attention; "
        "assert 'triton' not in sys.modules, 'triton was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
