"""Module surgery: install a decomposer's factors in a model, and describe/rebuild the resulting structure.

Every decomposer's output goes through :func:`apply_plan`; the dtype and device of each replaced
projection are preserved and its bias is kept outside the factors.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lowrank_kit.errors import LowRankError
from lowrank_kit.methods.base import Plan
from lowrank_kit.models.base import TARGETS, ModelAdapter
from lowrank_kit.modules import (
    DenseFactors,
    HeadFactors,
    JointFactors,
    JointLowRankProjection,
    LowRankLinear,
    PerHeadLowRankLinear,
    SharedLatent,
    build_joint_modules,
)


def _original(adapter: ModelAdapter, model: nn.Module, layer: int, target: str) -> nn.Linear:
    mod = adapter.get_projection(model, layer, target)
    if not isinstance(mod, nn.Linear):
        raise LowRankError(
            f"layer {layer} {target} is already a {type(mod).__name__}; decompose an uncompressed model"
        )
    return mod


def apply_plan(model: nn.Module, adapter: ModelAdapter, plan: Plan) -> nn.Module:
    """Replace the planned projections of ``model`` (in place) by low-rank modules."""
    for lp in plan.layers:
        for target, f in lp.factors.items():
            orig = _original(adapter, model, lp.layer, target)
            w, b = orig.weight, orig.bias
            bias = None if b is None else b.detach()
            if isinstance(f, DenseFactors):
                new = LowRankLinear.from_factors(f, bias, w.dtype, w.device)
            elif isinstance(f, HeadFactors):
                new = PerHeadLowRankLinear.from_factors(f, bias, w.dtype, w.device)
            else:
                raise TypeError(f"layer {lp.layer} {target}: unsupported factor type {type(f).__name__}")
            adapter.set_projection(model, lp.layer, target, new)
        if lp.joint is not None:
            origs = {t: _original(adapter, model, lp.layer, t) for t in lp.joint.A}
            ref = next(iter(origs.values())).weight
            biases = {t: (None if o.bias is None else o.bias.detach()) for t, o in origs.items()}
            for target, new in build_joint_modules(lp.joint, biases, ref.dtype, ref.device).items():
                adapter.set_projection(model, lp.layer, target, new)
    return model


def describe_structure(model: nn.Module, adapter: ModelAdapter) -> dict[str, dict[str, Any]]:
    """JSON-able description of every low-rank projection: ``{"<layer>": {target: spec}}``.

    Specs: ``{"kind": "dense", "rank": r}``, ``{"kind": "per_head", "ranks": [...]}``,
    ``{"kind": "joint", "rank": r, "group": [targets sharing the latent]}``.
    """
    info = adapter.info(model)
    out: dict[str, dict[str, Any]] = {}
    for layer in range(info.num_layers):
        mods = {t: adapter.get_projection(model, layer, t) for t in TARGETS}
        entry: dict[str, Any] = {}
        for t, mod in mods.items():
            if isinstance(mod, LowRankLinear):
                entry[t] = {"kind": "dense", "rank": mod.rank}
            elif isinstance(mod, PerHeadLowRankLinear):
                entry[t] = {"kind": "per_head", "ranks": list(mod.ranks)}
            elif isinstance(mod, JointLowRankProjection):
                group = [u for u, other in mods.items() if getattr(other, "shared", None) is mod.shared]
                entry[t] = {"kind": "joint", "rank": mod.rank, "group": group}
        if entry:
            out[str(layer)] = entry
    return out


def build_structure(
    model: nn.Module, adapter: ModelAdapter, structure: dict[str, dict[str, Any]]
) -> nn.Module:
    """Install empty low-rank modules matching ``structure`` (to load saved factors into)."""
    info = adapter.info(model)
    for layer_key, entry in structure.items():
        layer = int(layer_key)
        shared: dict[tuple[str, ...], SharedLatent] = {}
        for target, spec in entry.items():
            orig = _original(adapter, model, layer, target)
            factory = {"dtype": orig.weight.dtype, "device": orig.weight.device}
            has_bias = orig.bias is not None
            kind = spec.get("kind")
            if kind == "dense":
                new = LowRankLinear(
                    orig.in_features, orig.out_features, int(spec["rank"]), bias=has_bias, **factory
                )
            elif kind == "per_head":
                new = PerHeadLowRankLinear(
                    orig.in_features, info.head_dim, spec["ranks"], bias=has_bias, **factory
                )
            elif kind == "joint":
                key = tuple(spec["group"])
                if key not in shared:
                    shared[key] = SharedLatent(orig.in_features, int(spec["rank"]), **factory)
                new = JointLowRankProjection(shared[key], orig.out_features, bias=has_bias, **factory)
            else:
                raise ValueError(f"layer {layer} {target}: unknown low-rank kind {kind!r}")
            adapter.set_projection(model, layer, target, new)
    return model


def plan_ranks(plan: Plan) -> dict[str, dict[str, Any]]:
    """Ranks in a plan, keyed like :func:`describe_structure`."""
    out: dict[str, dict[str, Any]] = {}
    for lp in plan.layers:
        entry: dict[str, Any] = {}
        for t, f in lp.factors.items():
            entry[t] = f.ranks if isinstance(f, HeadFactors) else f.rank
        if isinstance(lp.joint, JointFactors):
            for t in lp.joint.A:
                entry[t] = lp.joint.rank
        out[str(lp.layer)] = entry
    return out
