"""The latent cache layer: chunked growth that keeps its contents, and transformers' layer interface."""

import pytest
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lowrank_kit.runtime import LatentCache, LatentDecodeError, LatentLayer
from lowrank_kit.runtime.convert import LatentFormat

FMT = LatentFormat(
    k_width=16, v_width=32, dtype=torch.float32, k_groups=2, v_groups=2, num_positions=3, norm_heads=2
)
JOINT = LatentFormat(
    k_width=16, v_width=None, dtype=torch.int8, k_groups=1, v_groups=1, num_positions=1, norm_heads=0
)


def _append(layer: LatentLayer, n: int, value: float) -> None:
    s0, s1 = layer.reserve(n)
    layer.k[:, s0:s1] = value
    if layer.v is not layer.k:
        layer.v[:, s0:s1] = -value
    layer.positions[:, s0:s1] = int(value)
    layer.commit(s1)


def _filled(fmt=FMT, batch=3, chunk=4, tokens=(5, 1, 1, 1)) -> LatentLayer:
    layer = LatentLayer(chunk=chunk)
    layer.initialize(fmt, batch, torch.device("cpu"))
    for i, n in enumerate(tokens):
        _append(layer, n, float(i + 1))
    return layer


def test_is_a_transformers_cache_layer():
    assert issubclass(LatentLayer, CacheLayerMixin)
    assert issubclass(LatentCache, Cache)
    assert LatentCache(num_layers=3).layers[2].get_seq_length() == 0


def test_growth_is_chunked_and_keeps_contents():
    layer = LatentLayer(chunk=8)
    layer.initialize(FMT, 2, torch.device("cpu"))
    capacities = []
    for t in range(200):
        _append(layer, 1, float(t))
        capacities.append(layer.capacity)
    assert layer.length == 200
    grown = sorted(set(capacities))
    assert all(c % 8 == 0 for c in grown)
    # Geometric growth: a handful of reallocations for 200 single-token appends, not one per token.
    assert len(grown) <= 10, grown
    assert torch.equal(layer.k[0, :200, 0], torch.arange(200, dtype=torch.float32))
    assert torch.equal(layer.positions[1, :200, 2], torch.arange(200, dtype=torch.int32))
    assert layer.k_norm.shape == (2, layer.capacity, 2)
    assert layer.k_scale is None


def test_interface_lengths_and_masks():
    layer = _filled()
    assert layer.get_seq_length() == 8
    assert layer.get_mask_sizes(1) == (9, 0)
    assert layer.get_mask_sizes(torch.arange(3)) == (11, 0)
    assert layer.get_max_length() == -1
    assert layer.ends().tolist() == [8, 8, 8]


def test_crop_both_conventions():
    layer = _filled()
    layer.crop(-3)
    assert layer.length == 5 and layer.ends().tolist() == [5, 5, 5]
    layer.crop(2)
    assert layer.length == 2


def test_batch_operations():
    layer = _filled()
    layer.k[1, :8] = 7.0
    layer.starts = torch.tensor([0, 2, 1], dtype=torch.int32)
    layer.reorder_cache(torch.tensor([1, 1, 0]))
    assert layer.k[0, 0, 0] == 7.0 and layer.k[2, 0, 0] == 1.0
    assert layer.starts.tolist() == [2, 2, 0]
    layer.batch_select_indices(torch.tensor([0, 2]))
    assert layer.batch == 2 and layer.starts.tolist() == [2, 0] and layer.ends().tolist() == [8, 8]
    layer.batch_repeat_interleave(2)
    assert layer.batch == 4 and layer.k.shape[0] == 4 and layer.positions.shape[0] == 4


def test_joint_latent_stays_shared_through_batch_operations():
    layer = _filled(JOINT)
    assert layer.v is layer.k and layer.v_scale is layer.k_scale
    assert layer.k.dtype == torch.int8 and layer.k_scale.shape[-1] == 1
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    assert layer.v is layer.k and layer.v_scale is layer.k_scale
    assert layer.nbytes() == layer.k.numel() + layer.k_scale.numel() * 4 + layer.positions.numel() * 4


def test_reset():
    layer = _filled()
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.k is None and not layer.is_initialized


def test_max_length_sizes_the_first_allocation():
    layer = LatentLayer(chunk=8, max_length=300)
    layer.initialize(FMT, 2, torch.device("cpu"))
    capacities = set()
    for t in range(300):
        _append(layer, 1, float(t))
        capacities.add(layer.capacity)
    assert capacities == {304}  # one allocation, rounded up to the chunk, for all 300 tokens
    for t in range(300, 305):  # past the allocation the cache grows as without max_length
        _append(layer, 1, float(t))
    assert layer.capacity == 456 and layer.length == 305
    assert torch.equal(layer.k[0, :305, 0], torch.arange(305, dtype=torch.float32))


def test_latent_cache_passes_chunk_and_max_length_to_its_layers():
    made = LatentCache(chunk=8, max_length=100).new_layer()
    assert (made.chunk, made.max_length) == (8, 100)
    assert [(x.chunk, x.max_length) for x in LatentCache(2, chunk=4, max_length=9).layers] == [(4, 9)] * 2
    with pytest.raises(LatentDecodeError, match=r"max_length is the number of tokens .* got 0"):
        LatentCache(max_length=0)
