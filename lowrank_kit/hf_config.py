"""The ``model_type`` of a compressed checkpoint, which keeps transformers alone from loading it wrong.

A compressed checkpoint's projections are factors and integers that no transformers model class holds.
Loaded by transformers in a process that never imported lowrank_kit, its ``quantization_config`` would be
skipped with a warning and the q/k/v projections initialised at random. So ``config.json`` says
``"model_type": "lowrank_kit"`` and keeps the model's own type in ``lowrank_config.base_model_type``:

- without lowrank_kit, ``AutoConfig`` / ``AutoModel*`` / ``pipeline`` fail at once ("model type
  `lowrank_kit` ... not recognize[d]");
- a model's own class (``LlavaForConditionalGeneration.from_pretrained(path)``) only warns about a
  foreign model type, then looks for a top-level entry of its own type; ``config.json`` has one,
  ``lowrank_kit_guard``, whose ``dtype`` is a sentence that no torch dtype is called, so that load fails
  too, with that sentence ("... has no attribute 'this is a lowrank_kit checkpoint: load it with ...'");
- with lowrank_kit imported, :class:`LowRankKitConfig` is registered under that type and hands the dict
  (without the guard) to the model's own config class, so ``AutoModelForImageTextToText.from_pretrained``
  builds the real model and the quantizer of :mod:`lowrank_kit.hf_integration` installs the compressed
  modules.

:mod:`lowrank_kit.hf_hook` registers this as soon as transformers' ``configuration_auto`` is imported
(which is before any model class); nothing here imports model code.
"""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

from lowrank_kit.errors import CheckpointError

MODEL_TYPE = "lowrank_kit"
CONFIG_KEY = "lowrank_config"
BASE_TYPE_KEY = "base_model_type"
GUARD_KEY = "lowrank_kit_guard"
GUARD_MESSAGE = (
    "this is a lowrank_kit checkpoint: load it with lowrank_kit.load(path), or import lowrank_kit and use "
    "an AutoModel class"
)


def guard_entry(base_model_type: str) -> dict[str, str]:
    """The ``config.json`` entry that makes the model's own config class fail (module docstring)."""
    return {"model_type": base_model_type, "dtype": GUARD_MESSAGE}


def base_config_dict(config_dict: dict[str, Any], where: str = "this checkpoint") -> dict[str, Any]:
    """``config_dict`` with the model's own ``model_type`` put back and the guard left out (a copy);
    other dicts unchanged."""
    if config_dict.get("model_type") != MODEL_TYPE:
        return config_dict
    block = config_dict.get(CONFIG_KEY)
    if not isinstance(block, dict):
        raise CheckpointError(
            f"{where} has model_type {MODEL_TYPE!r} but its config.json has no {CONFIG_KEY!r} block; it was "
            "edited or truncated"
        )
    base = block.get(BASE_TYPE_KEY)
    if not isinstance(base, str) or not base:
        raise CheckpointError(
            f"{where} has model_type {MODEL_TYPE!r} but no {CONFIG_KEY}.{BASE_TYPE_KEY}; config.json was "
            "edited or truncated"
        )
    if base not in CONFIG_MAPPING:
        raise CheckpointError(
            f"{where} holds a {base!r} model, which this transformers does not know; upgrade transformers"
        )
    restored = {k: v for k, v in config_dict.items() if k != GUARD_KEY}
    return {**restored, "model_type": base}


def checkpoint_config(
    config_dict: dict[str, Any], where: str = "this checkpoint", **kwargs: Any
) -> PreTrainedConfig:
    """The model's own config (``LlavaConfig``, ``LlamaConfig``...) from a checkpoint's ``config.json`` dict."""
    restored = base_config_dict(config_dict, where)
    return CONFIG_MAPPING[restored["model_type"]].from_dict(restored, **kwargs)


class LowRankKitConfig(PreTrainedConfig):
    """Registered under ``model_type: lowrank_kit``; never instantiated: :meth:`from_dict` returns the
    model's own config class."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PreTrainedConfig:
        return checkpoint_config(config_dict, **kwargs)


def register() -> None:
    """Make ``model_type: lowrank_kit`` known to ``AutoConfig`` (idempotent)."""
    if MODEL_TYPE in CONFIG_MAPPING:
        if CONFIG_MAPPING[MODEL_TYPE] is LowRankKitConfig:
            return
        raise CheckpointError(
            f"transformers already has a config for model_type {MODEL_TYPE!r}; uninstall the package that "
            "registers it"
        )
    AutoConfig.register(MODEL_TYPE, LowRankKitConfig)


register()
