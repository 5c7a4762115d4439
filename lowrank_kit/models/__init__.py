"""Model families, aliases and tiny models (loading is :mod:`lowrank_kit.loading`).

Names are resolved lazily so that importing :mod:`lowrank_kit.models.base` (the registry does) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AttentionInfo": "lowrank_kit.models.base",
    "ModelAdapter": "lowrank_kit.models.base",
    "RopeInfo": "lowrank_kit.models.base",
    "ADAPTERS": "lowrank_kit.models.families",
    "chat_template_inputs": "lowrank_kit.models.families.common",
    "PRESETS": "lowrank_kit.models.presets",
    "Preset": "lowrank_kit.models.presets",
    "build_random_model": "lowrank_kit.models.presets",
    "preset_config": "lowrank_kit.models.presets",
    "build_tiny_model": "lowrank_kit.models.tiny",
    "build_tiny_processor": "lowrank_kit.models.tiny",
    "save_tiny_checkpoint": "lowrank_kit.models.tiny",
    "tiny_inputs": "lowrank_kit.models.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowrank_kit.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
