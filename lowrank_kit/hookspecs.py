"""pluggy hook specifications.

Built-in methods and adapters register through exactly these hooks (see :mod:`lowrank_kit.builtin`),
as do external plugins found through the ``lowrank_kit`` entry-point group. Each hook receives a
``register`` callback; calling it with an object of the wrong kind, or with a name that is already
taken, raises :class:`~lowrank_kit.errors.RegistryError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "lowrank_kit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class LowRankKitSpec:
    @hookspec
    def register_decomposers(self, register: Callable[[Any], None]) -> None:
        """Register :class:`~lowrank_kit.methods.base.Decomposer` subclasses: ``register(MyMethod)``."""

    @hookspec
    def register_quantizers(self, register: Callable[[Any], None]) -> None:
        """Register :class:`~lowrank_kit.methods.base.Quantizer` subclasses: ``register(MyQuantizer)``."""

    @hookspec
    def register_model_adapters(self, register: Callable[[Any], None]) -> None:
        """Register :class:`~lowrank_kit.models.base.ModelAdapter` instances: ``register(adapter)``."""
