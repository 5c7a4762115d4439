"""Quantizer round trips, the clip search, int4 packing, and the latent-cache formats."""

import pytest
import torch

from lowrank_kit.kernels.latent_attention.layout import (
    LatentLayout,
    dequantize_latents,
    quantize_int4,
    quantize_int8,
)
from lowrank_kit.quant.modules import ActQuant
from lowrank_kit.quant.primitives import (
    CLIP_GRID,
    clip_error,
    fake_quant_groups,
    fake_quant_tokens,
    pack_int4,
    quantize_weight,
    unpack_int4,
)


def _heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    w[:, :3] *= 20  # a few outlier columns
    return w


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_round_trip_within_half_a_step(bits):
    w = _heavy_tailed(17, 33)
    qw = quantize_weight(w, bits, clip_search=False)
    assert qw.q.dtype == torch.int8 and int(qw.q.abs().max()) <= 2 ** (bits - 1) - 1
    err = (qw.dequantize() - w).abs()
    # Half a step plus fp32 rounding of the division (a few ulps of the value).
    assert (err <= qw.scale[:, None] / 2 + 1e-6 * w.abs()).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_clip_search_never_increases_the_error(bits):
    torch.manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((64, 128))  # heavy tails, as trained weights have
    plain = quantize_weight(w, bits, clip_search=False)
    searched = quantize_weight(w, bits, clip_search=True)
    e_plain = clip_error(w, plain.scale, bits)
    e_search = clip_error(w, searched.scale, bits)
    assert (e_search <= e_plain).all()
    grid = torch.tensor(CLIP_GRID, dtype=torch.float32)
    assert torch.isin(searched.clip, grid).all()
    if bits == 4:
        # At 4 bits, clipping the tails pays off on every row of this distribution.
        assert (e_search < e_plain).all() and float(searched.clip.max()) < 1.0


def test_clip_grid_is_the_documented_one():
    assert len(CLIP_GRID) == 80 and CLIP_GRID[0] == 1.0 and CLIP_GRID[-1] == pytest.approx(0.21)


def test_zero_rows_and_tokens_stay_finite():
    w = torch.zeros(3, 5)
    qw = quantize_weight(w, 8)
    assert torch.equal(qw.dequantize(), w)
    x = torch.zeros(2, 4)
    assert torch.equal(fake_quant_tokens(x, 8), x)
    assert torch.equal(fake_quant_groups(x, (1, 3), 4), x)


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_round_trip_within_half_a_step(bits):
    x = torch.randn(4, 7, 32)
    y = fake_quant_tokens(x, bits)
    step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    assert ((y - x).abs() <= step / 2 + 1e-6 * x.abs()).all()
    # A clip below 1 saturates the largest values of each token at clip · max.
    clipped = fake_quant_tokens(x, bits, clip=0.5)
    assert torch.allclose(clipped.abs().amax(-1), 0.5 * x.abs().amax(-1), rtol=1e-5)


def test_int4_packing_round_trip():
    q = torch.randint(-8, 8, (3, 11), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 6)
    assert torch.equal(unpack_int4(packed, 11), q)
    # Column 2j in the low nibble, 2j+1 in the high one.
    assert int(packed[0, 0]) == (int(q[0, 0]) & 0xF) | ((int(q[0, 1]) & 0xF) << 4)
    with pytest.raises(ValueError, match=r"values in \[-8, 7\]"):
        pack_int4(torch.tensor([9], dtype=torch.int8))
    with pytest.raises(ValueError, match="takes int8"):
        pack_int4(torch.tensor([1]))


@pytest.mark.parametrize("bits", [4, 8])
def test_latent_fake_quant_is_the_cache_format(bits):
    # Ragged per-head ranks; the forward's fake quantization equals storing the latent as the decode
    # kernel reads it (layout.quantize_int8 / quantize_int4) and reading it back, bit for bit.
    layout = LatentLayout.per_head([5, 3, 7], align=16)
    x = torch.randn(2, 9, 15)
    store = quantize_int8 if bits == 8 else quantize_int4
    q, scale = store(layout.pack(x), layout)
    assert scale.shape == (2, 9, 3)
    assert q.shape[-1] == (layout.row_width if bits == 8 else layout.row_width // 2)
    back = dequantize_latents(q, scale, layout, bits)[..., layout.packed_columns()]
    assert torch.equal(back, fake_quant_groups(x, layout.ranks, bits))
    step = scale[..., torch.repeat_interleave(torch.arange(3), torch.tensor(layout.ranks))]
    assert ((back - x).abs() <= step / 2 + 1e-6 * x.abs()).all()


def test_act_quant_spec_errors():
    with pytest.raises(ValueError, match="supports"):
        ActQuant(3)
    with pytest.raises(ValueError, match=r"clip ratio must be in \(0, 1\]"):
        ActQuant(8, clip=1.5)
    with pytest.raises(ValueError, match="no clip ratio"):
        ActQuant(8, clip=0.9, groups=(4,))
    spec = ActQuant(4, groups=(3, 5))
    assert ActQuant.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="the groups"):
        fake_quant_groups(torch.zeros(2, 7), (3, 5), 8)
