"""lowrank_kit: low-rank decomposition and quantization for vision-language models.

The public surface is small and pinned by ``tests/test_public_api.py``::

    import lowrank_kit
    recipe = lowrank_kit.recipe_from_flags(method="svd", ratio=0.6)
    result = lowrank_kit.compress(model, recipe)          # in memory
    loaded = lowrank_kit.load("out/testbed-svd-0.6")       # a saved checkpoint

Names are imported lazily so that ``import lowrank_kit`` stays cheap (no triton, no model code).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "lowrank_kit.pipeline",
    "compress_to_directory": "lowrank_kit.pipeline",
    "CompressionResult": "lowrank_kit.pipeline",
    "load": "lowrank_kit.loading",
    "enable_latent_decode": "lowrank_kit.runtime",
    "Recipe": "lowrank_kit.recipe",
    "load_recipe": "lowrank_kit.recipe",
    "save_recipe": "lowrank_kit.recipe",
    "recipe_from_flags": "lowrank_kit.recipe",
    "load_model": "lowrank_kit.loading",
    "get_registry": "lowrank_kit.registry",
    "hookimpl": "lowrank_kit.hookspecs",
    "Decomposer": "lowrank_kit.methods.base",
    "Quantizer": "lowrank_kit.methods.base",
    "MethodConfig": "lowrank_kit.methods.base",
    "ModelAdapter": "lowrank_kit.models.base",
    "LowRankError": "lowrank_kit.errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowrank_kit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


# `from_pretrained` of a compressed checkpoint needs lowrank_kit's quantizer in transformers' registry;
# this registers it once transformers loads that registry, without importing transformers here.
from lowrank_kit import hf_hook as _hf_hook  # noqa: E402

_hf_hook.install()
