"""The quantized structure of a model as data: described for the checkpoint, installed again at load.

:func:`quantized_structure` lists every module a quantizer installed or marked, keyed by its dotted
path: ``quant_linear`` (a :class:`~lowrank_kit.quant.modules.QuantLinear`), ``quant_per_head``
(:class:`~lowrank_kit.quant.modules.QuantPerHeadLowRankLinear`), ``hadamard_input``
(:class:`~lowrank_kit.quant.modules.HadamardInput`), each with the ``kv_bits`` of a K/V projection
when the latent cache is quantized, and ``mark`` for a module that is only marked (a
``LowRankLinear`` whose factors are quantized inside it). :func:`install_quantized` rebuilds empty
modules of that layout (parents before children) so that the weights can be loaded into them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lowrank_kit.errors import LowRankError
from lowrank_kit.models.base import ModelAdapter, get_submodule, set_submodule
from lowrank_kit.modules import PerHeadLowRankLinear
from lowrank_kit.quant.modules import (
    QUANT_MODULES,
    ActQuant,
    HadamardInput,
    HadamardTransform,
    QuantLinear,
    QuantPerHeadLowRankLinear,
)


def check_not_quantized(model: nn.Module, method: str) -> None:
    """Quantizers work on float models: running one on quantized integers would stack errors silently."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear | QuantPerHeadLowRankLinear):
            raise LowRankError(
                f"{method}: the model is already quantized ({name} is a {type(mod).__name__}); quantize "
                "a float model, with one quantize step whose methods run in order (hadamard, qat, rtn)"
            )


def is_tied(model: nn.Module, adapter: ModelAdapter) -> bool:
    lm_head = get_submodule(model, adapter.lm_head)
    embed = get_submodule(model, adapter.embed_tokens)
    shared = lm_head.weight is getattr(embed, "weight", None)
    configs = [model.config, model.config.get_text_config()]
    return shared or any(bool(getattr(c, "tie_word_embeddings", False)) for c in configs)


def untie_embeddings(model: nn.Module, adapter: ModelAdapter) -> None:
    """Give lm_head its own copy of the embedding table and record that in the config(s)."""
    lm_head = get_submodule(model, adapter.lm_head)
    lm_head.weight = nn.Parameter(lm_head.weight.detach().clone(), requires_grad=lm_head.weight.requires_grad)
    for c in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False


def quantized_structure(model: nn.Module) -> dict[str, Any]:
    """``{path: spec}`` of every quantized, wrapped or marked module (empty for a float model)."""
    out: dict[str, Any] = {}
    for name, mod in model.named_modules():
        spec: dict[str, Any] | None = None
        if isinstance(mod, QUANT_MODULES):
            spec = mod.spec()
        elif getattr(mod, "kv_bits", None) is not None:
            spec = {"kind": "mark"}
        if spec is None:
            continue
        kv = getattr(mod, "kv_bits", None)
        if kv is not None:
            spec["kv_bits"] = int(kv)
        out[name] = spec
    return out


def _factory(module: nn.Module) -> dict[str, Any]:
    ref = next(iter(module.parameters()), None)
    if ref is None:
        ref = next(iter(module.buffers()))
    return {"dtype": ref.dtype, "device": ref.device}


def _install_one(model: nn.Module, path: str, spec: dict[str, Any]) -> None:
    kind = spec.get("kind")
    current = get_submodule(model, path)
    if kind == "quant_linear":
        if not isinstance(current, nn.Linear):
            raise ValueError(f"{path}: expected an nn.Linear to quantize, found {type(current).__name__}")
        if (current.in_features, current.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(
                f"{path}: the structure says {spec['in_features']}→{spec['out_features']}, the model has "
                f"{current.in_features}→{current.out_features}"
            )
        new: nn.Module = QuantLinear(
            current.in_features,
            current.out_features,
            bias=bool(spec["bias"]),
            weight_bits=int(spec["weight_bits"]),
            input_quant=ActQuant.from_dict(spec.get("input_quant")),
            output_quant=ActQuant.from_dict(spec.get("output_quant")),
            **_factory(current),
        )
    elif kind == "quant_per_head":
        if not isinstance(current, PerHeadLowRankLinear):
            raise ValueError(f"{path}: expected a PerHeadLowRankLinear, found {type(current).__name__}")
        if list(current.ranks) != list(spec["ranks"]):
            raise ValueError(f"{path}: ranks {spec['ranks']} in the structure, {current.ranks} in the model")
        new = QuantPerHeadLowRankLinear(
            current.in_features,
            current.head_dim,
            current.ranks,
            bias=bool(spec["bias"]),
            up_bits=int(spec["up_bits"]),
            up_input_quant=ActQuant.from_dict(spec.get("up_input_quant")),
            down=current.down,
            **_factory(current),
        )
    elif kind == "hadamard_input":
        if not isinstance(current, nn.Linear):
            raise ValueError(
                f"{path}: expected an nn.Linear behind the online Hadamard, found {type(current).__name__}"
            )
        transform = HadamardTransform(list(spec["orders"]), list(spec["kinds"]), device=current.weight.device)
        if transform.size != current.in_features:
            raise ValueError(f"{path}: a transform of size {transform.size} for {current.in_features} inputs")
        new = HadamardInput(transform, current)
    elif kind == "mark":
        new = current
    else:
        raise ValueError(f"{path}: unknown quantized module kind {kind!r}")
    if "kv_bits" in spec:
        new.kv_bits = int(spec["kv_bits"])
    if new is not current:
        set_submodule(model, path, new)


def install_quantized(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Install empty quantized modules of ``structure`` (from :func:`quantized_structure`) in ``model``."""
    if not isinstance(structure, dict):
        raise ValueError(f"quantized_modules must be a mapping, got {type(structure).__name__}")
    # Parents first: a wrapper (o_proj) before the linear inside it (o_proj.linear), a per-head module
    # before its down-projection.
    for path in sorted(structure, key=lambda p: (p.count("."), p)):
        spec = structure[path]
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: a quantized module spec must be a mapping, got {spec!r}")
        _install_one(model, path, spec)
    return model
