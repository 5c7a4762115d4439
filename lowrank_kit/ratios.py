"""ρ1 (parameter ratio) and ρ2 (cache ratio) of a compressed model, counted from its modules.

ρ1 = parameters of all decomposed factors / parameters of the original matrices they replace (shared
latents counted once). ρ2 = cached latent elements per token / original K+V elements per token, over
all layers. Biases are kept outside the factors and count in neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from lowrank_kit.models.base import TARGETS, ModelAdapter
from lowrank_kit.modules import JointLowRankProjection, LowRankLinear, PerHeadLowRankLinear
from lowrank_kit.quant.modules import QuantLinear


def _factor_params(mod: nn.Module, seen_shared: set[int]) -> int:
    if isinstance(mod, LowRankLinear):
        return mod.down.weight.numel() + mod.up.weight.numel()
    if isinstance(mod, PerHeadLowRankLinear):
        return mod.down.weight.numel() + mod.up_weight.numel()
    if isinstance(mod, JointLowRankProjection):
        shared = 0
        if id(mod.shared) not in seen_shared:
            seen_shared.add(id(mod.shared))
            shared = mod.shared.down.weight.numel()
        return shared + mod.up.weight.numel()
    raise TypeError(f"{type(mod).__name__} is not a low-rank module")


def _latent_width(mod: nn.Module) -> int:
    if isinstance(mod, LowRankLinear):
        return mod.rank
    if isinstance(mod, PerHeadLowRankLinear):
        return sum(mod.ranks)
    if isinstance(mod, JointLowRankProjection):
        return mod.rank
    return mod.out_features  # an ordinary Linear caches its full output


@dataclass
class Ratios:
    rho1: float | None  # None when nothing is decomposed
    rho2: float
    factor_params: int
    replaced_params: int
    cache_elements_per_token: int
    original_cache_elements_per_token: int


def shares_latent(k: nn.Module, v: nn.Module) -> bool:
    """Whether the K and V projections of a layer cache one latent (a joint K/V decomposition)."""
    return (
        isinstance(k, JointLowRankProjection)
        and isinstance(v, JointLowRankProjection)
        and k.shared is v.shared
    )


def kv_projections(model: nn.Module, adapter: ModelAdapter) -> Iterator[tuple[nn.Module, nn.Module, bool]]:
    """Per decoder layer: its K and V projections and whether they share one cached latent."""
    for layer in range(adapter.info(model).num_layers):
        k = adapter.get_projection(model, layer, "k_proj")
        v = adapter.get_projection(model, layer, "v_proj")
        yield k, v, shares_latent(k, v)


def cache_widths(model: nn.Module, adapter: ModelAdapter) -> list[int]:
    """Cached elements per token for each layer: K side plus V side (a latent shared by K and V once)."""
    return [
        _latent_width(k) if shared else _latent_width(k) + _latent_width(v)
        for k, v, shared in kv_projections(model, adapter)
    ]


def compute_ratios(model: nn.Module, adapter: ModelAdapter) -> Ratios:
    info = adapter.info(model)
    factor, replaced = 0, 0
    for layer in range(info.num_layers):
        seen: set[int] = set()
        for target in TARGETS:
            mod = adapter.get_projection(model, layer, target)
            if isinstance(mod, nn.Linear | QuantLinear):  # a dense projection, float or quantized
                continue
            factor += _factor_params(mod, seen)
            replaced += mod.in_features * mod.out_features
    widths = cache_widths(model, adapter)
    original = info.num_layers * 2 * info.num_kv_heads * info.head_dim
    return Ratios(
        rho1=factor / replaced if replaced else None,
        rho2=sum(widths) / original,
        factor_params=factor,
        replaced_params=replaced,
        cache_elements_per_token=sum(widths),
        original_cache_elements_per_token=original,
    )
