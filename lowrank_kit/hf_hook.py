"""Registers lowrank_kit with transformers as soon as transformers can take it.

``import lowrank_kit`` must stay light (no transformers import), yet ``import lowrank_kit`` followed by
``AutoModelForImageTextToText.from_pretrained(path)`` must rebuild a compressed checkpoint. Two
registrations make that work, each in a transformers module:

- ``transformers.models.auto.configuration_auto``: the ``lowrank_kit`` model type of a checkpoint's
  ``config.json`` (:mod:`lowrank_kit.hf_config`), needed first, when ``from_pretrained`` reads the config;
- ``transformers.quantizers.auto``: the ``lowrank`` quantizer that installs the compressed modules
  (:mod:`lowrank_kit.hf_integration`).

transformers has no plugin entry point for either, so :func:`install` registers at once for a module
already imported and otherwise puts a finder on ``sys.meta_path`` that waits for the module, lets it
execute normally, then registers (and removes itself when both are done). Nothing of transformers is
replaced; only the registration is deferred.

Only the standard library is imported here.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType

# transformers module -> the lowrank_kit module that registers with it (on import, through `register()`)
WATCHED = {
    "transformers.models.auto.configuration_auto": "lowrank_kit.hf_config",
    "transformers.quantizers.auto": "lowrank_kit.hf_integration",
}
_lock = threading.Lock()


def _register(watched: str) -> None:
    ours = WATCHED[watched]
    module = sys.modules.get(ours)
    if module is not None and not hasattr(module, "register"):
        # Our module is itself importing transformers; it registers when it finishes.
        return
    importlib.import_module(ours).register()


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of a watched module, then registers lowrank_kit with it."""

    def __init__(self, loader: importlib.abc.Loader, watched: str) -> None:
        self._loader = loader
        self._watched = watched

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register(self._watched)


class _TransformersWatcher(importlib.abc.MetaPathFinder):
    def __init__(self, pending: set[str]) -> None:
        self.pending = pending

    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending:
            return None
        with _lock:
            if fullname not in self.pending or self not in sys.meta_path:
                return None
            self.pending.discard(fullname)
            if not self.pending:
                sys.meta_path.remove(self)
        # The other finders locate the module as they normally would; only its loader is wrapped.
        for finder in list(sys.meta_path):
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                spec.loader = _RegisteringLoader(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Register with each watched transformers module now if it is loaded, else as soon as it is."""
    pending = set()
    for watched in WATCHED:
        if watched in sys.modules:
            _register(watched)
        else:
            pending.add(watched)
    if not pending:
        return
    with _lock:
        if not any(isinstance(f, _TransformersWatcher) for f in sys.meta_path):
            sys.meta_path.insert(0, _TransformersWatcher(pending))
