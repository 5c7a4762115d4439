"""The plugin registry: decomposers, quantizers and model adapters, keyed by name.

Everything is registered through the pluggy hooks in :mod:`lowrank_kit.hookspecs`: the built-ins (the
plugin ``lowrank_kit.builtin``) and external plugins found through the ``lowrank_kit`` entry-point
group. ``LOWRANK_KIT_PLUGINS`` restricts which external plugins load: unset loads all, an empty value
loads none, otherwise a comma-separated list of entry-point names.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from lowrank_kit import builtin
from lowrank_kit.errors import ModelLoadError, RegistryError, unknown_name
from lowrank_kit.hookspecs import PROJECT, LowRankKitSpec
from lowrank_kit.methods.base import Decomposer, Quantizer
from lowrank_kit.models.base import ModelAdapter, config_identity

ENTRY_POINT_GROUP = "lowrank_kit"
ALLOW_ENV = "LOWRANK_KIT_PLUGINS"
BUILTIN = "lowrank_kit.builtin"

KINDS = {
    "decomposer": "register_decomposers",
    "quantizer": "register_quantizers",
    "model_adapter": "register_model_adapters",
}


@dataclass
class PluginInfo:
    name: str
    source: str  # "built-in", or "entry point <name> (<dist> <version>)", or "registered in code"
    registered: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "registered": self.registered}


@dataclass
class Entry:
    obj: Any
    plugin: str


def _check_kind(kind: str, obj: Any) -> str:
    expected = {"decomposer": Decomposer, "quantizer": Quantizer, "model_adapter": ModelAdapter}[kind]
    if kind == "model_adapter":
        ok = isinstance(obj, ModelAdapter)
        what = "a ModelAdapter instance"
    else:
        ok = isinstance(obj, type) and issubclass(obj, expected) and obj is not expected
        what = f"a subclass of {expected.__module__}.{expected.__name__}"
    if not ok:
        raise RegistryError(f"cannot register {obj!r} as a {kind}: expected {what}")
    name = getattr(obj, "name", None)
    if (
        not isinstance(name, str)
        or not name
        or not name.replace("_", "").replace("-", "").replace(".", "").isalnum()
    ):
        raise RegistryError(
            f"cannot register {obj!r} as a {kind}: its `name` must be a non-empty identifier, got {name!r}"
        )
    return name


class Registry:
    """Names → objects for each kind, with the plugin each came from."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(LowRankKitSpec)
        self.entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self.plugins: dict[str, PluginInfo] = {}

    # -- loading ------------------------------------------------------------------------------------
    def add_plugin(self, plugin: Any, name: str, source: str) -> None:
        """Register a plugin object (module or instance with hookimpls) and collect what it registers."""
        if name in self.plugins:
            raise RegistryError(f"plugin {name!r} is loaded twice ({self.plugins[name].source}; {source})")
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        info = PluginInfo(name, source)
        self.plugins[name] = info
        for kind, hook in KINDS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin_name == name:
                    impl.function(register=self._register_fn(kind, info))

    def _register_fn(self, kind: str, info: PluginInfo):
        def register(obj: Any) -> None:
            key = _check_kind(kind, obj)
            if key in self.entries[kind]:
                other = self.entries[kind][key].plugin
                raise RegistryError(
                    f"{kind.replace('_', ' ')} {key!r} is registered twice: by plugin {other!r} and by plugin "
                    f"{info.name!r}; rename one, or restrict external plugins with {ALLOW_ENV}"
                )
            self.entries[kind][key] = Entry(obj, info.name)
            info.registered[kind].append(key)

        return register

    def load_entry_points(self) -> None:
        allowed_raw = os.environ.get(ALLOW_ENV)
        allowed = None if allowed_raw is None else {p.strip() for p in allowed_raw.split(",") if p.strip()}
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if allowed is not None and ep.name not in allowed:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not be silently skipped
                raise RegistryError(
                    f"external plugin {ep.name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}; "
                    f"fix or uninstall it, or exclude it with {ALLOW_ENV}"
                ) from exc
            dist = getattr(ep, "dist", None)
            origin = f"entry point {ep.name} = {ep.value}" + (
                f" ({dist.name} {dist.version})" if dist else ""
            )
            self.add_plugin(plugin, ep.name, origin)

    # -- lookup ---------------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        try:
            return self.entries[kind][name].obj
        except KeyError:
            raise unknown_name(kind.replace("_", " "), name, self.entries[kind]) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def source_of(self, kind: str, name: str) -> str:
        return self.entries[kind][name].plugin


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry: built-ins first, then the allowed external plugins."""
    reg = Registry()
    reg.add_plugin(builtin, BUILTIN, "built-in")
    reg.load_entry_points()
    return reg


def reset_registry() -> None:
    """Forget the loaded registry (tests; after changing ``LOWRANK_KIT_PLUGINS``)."""
    get_registry.cache_clear()


def get_decomposer(name: str):
    return get_registry().get("decomposer", name)


def get_quantizer(name: str):
    return get_registry().get("quantizer", name)


def get_adapter(name: str):
    return get_registry().get("model_adapter", name)


def adapters() -> list:
    reg = get_registry()
    return [reg.get("model_adapter", n) for n in reg.names("model_adapter")]


# -- recognising a model's family ----------------------------------------------------------------------
def supported_architectures() -> str:
    """One line listing the supported families: name, model class and model types of each adapter."""
    return "; ".join(
        f"{a.name} ({a.model_class}, model_type {'/'.join(a.model_types)})"
        for a in adapters()
        if not a.unsupported
    )


def adapter_for_config(config: Any):
    """The registered adapter whose model_type (or architecture) ``config`` has.

    ``config`` is a transformers config or a ``config.json`` dict. An architecture no adapter claims is
    an error that lists the supported ones; a family that is recognised but refused is an error that
    says why.
    """
    model_type, archs = config_identity(config)
    candidates = adapters()
    by_type = [a for a in candidates if model_type in a.model_types]
    found = by_type or [a for a in candidates if a.model_class in archs]
    if not found:
        what = f"model_type {model_type!r}" + (f", architectures {list(archs)}" if archs else "")
        raise ModelLoadError(f"unsupported architecture ({what}); supported: {supported_architectures()}")
    if len(found) > 1:
        names = ", ".join(a.name for a in found)
        raise ModelLoadError(
            f"model_type {model_type!r} is claimed by several adapters ({names}); uninstall one"
        )
    adapter = found[0]
    if adapter.unsupported:
        raise ModelLoadError(adapter.unsupported)
    return adapter
