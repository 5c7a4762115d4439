"""What a quantized model's report says: weights counted as parameters, and the cache size vs FP16."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.modules import JointLowRankProjection, LowRankLinear, PerHeadLowRankLinear
from lowrank_kit.quant.modules import QuantLinear, QuantPerHeadLowRankLinear
from lowrank_kit.ratios import compute_ratios, kv_projections

# Bits of one dequantization scale in the latent cache (fp32, as the decode kernel reads it).
SCALE_BITS = 32


def logical_parameters(model: nn.Module) -> int:
    """Parameters as a float model would count them: stored integer weights count one per element."""
    total = sum(p.numel() for p in model.parameters())
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.in_features * mod.out_features
        elif isinstance(mod, QuantPerHeadLowRankLinear):
            total += mod.head_dim * sum(mod.ranks)
    return total


def held_tensor_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds: parameters, buffers, and tensors kept in module attributes or
    in the attributes of objects they hold (where a cached copy of a weight would hide), each storage
    view once. A quantized model that keeps no float copy of its integers holds the same bytes after a
    forward as before it."""
    seen: set[tuple[int, torch.dtype, int, int]] = set()
    total = 0
    for mod in model.modules():
        tensors = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
        for value in vars(mod).values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif hasattr(value, "__dict__") and not isinstance(value, nn.Module):
                tensors += [t for t in vars(value).values() if isinstance(t, torch.Tensor)]
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.dtype, t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def _groups(mod: nn.Module, num_kv_heads: int) -> int:
    """Scales per token a quantized cache of this projection's output (or latent) holds."""
    if isinstance(mod, PerHeadLowRankLinear):
        return mod.num_heads
    if isinstance(mod, LowRankLinear | JointLowRankProjection):
        return 1
    return num_kv_heads  # the full K or V, one group per KV head


def cache_report(model: nn.Module, adapter: ModelAdapter, kv_bits: int | None) -> dict[str, Any]:
    """ρ2 and the cache size relative to FP16: latent elements × latent bits / (original K+V × 16).

    ``cache_ratio_vs_fp16_with_scales`` adds the per-(token, group) fp32 scales an int cache stores.
    """
    info = adapter.info(model)
    ratios = compute_ratios(model, adapter)
    bits = kv_bits if kv_bits is not None else 16
    groups = sum(
        _groups(k, info.num_kv_heads) + (0 if shared else _groups(v, info.num_kv_heads))
        for k, v, shared in kv_projections(model, adapter)
    )
    original_bits = ratios.original_cache_elements_per_token * 16
    latent_bits = ratios.cache_elements_per_token * bits
    scale_bits = groups * SCALE_BITS if kv_bits is not None else 0
    return {
        "rho2": ratios.rho2,
        "cache_bits": bits,
        "cache_groups_per_token": groups,
        "cache_ratio_vs_fp16": latent_bits / original_bits,
        "cache_ratio_vs_fp16_with_scales": (latent_bits + scale_bits) / original_bits,
    }
