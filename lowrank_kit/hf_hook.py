"""Registers lowrank_kit with transformers' quantizer registry as soon as transformers can take it.

``import lowrank_kit`` must stay light (no transformers import), yet ``import lowrank_kit`` followed by
``AutoModelForImageTextToText.from_pretrained(path)`` must rebuild a compressed checkpoint. transformers
has no plugin entry point for quantizers, so :func:`install` does one of two things:

- ``transformers.quantizers.auto`` is already imported: register now;
- otherwise: put a finder on ``sys.meta_path`` that waits for that module, lets it execute normally, then
  registers and removes itself. Nothing of transformers is replaced; only the registration is deferred.

Only the standard library is imported here.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType

WATCHED = "transformers.quantizers.auto"
INTEGRATION = "lowrank_kit.hf_integration"
_lock = threading.Lock()


def _register() -> None:
    module = sys.modules.get(INTEGRATION)
    if module is not None and not hasattr(module, "register"):
        # lowrank_kit.hf_integration is itself importing transformers; it registers when it finishes.
        return
    importlib.import_module(INTEGRATION).register()


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of the watched module, then registers lowrank_kit's quantizer."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register()


class _TransformersWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != WATCHED:
            return None
        with _lock:
            if self not in sys.meta_path:
                return None
            sys.meta_path.remove(self)
        # The remaining finders locate the module as they normally would; only its loader is wrapped.
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else as soon as it is."""
    if WATCHED in sys.modules:
        _register()
        return
    with _lock:
        if not any(isinstance(f, _TransformersWatcher) for f in sys.meta_path):
            sys.meta_path.insert(0, _TransformersWatcher())
