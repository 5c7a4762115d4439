import types

import pytest

from lowrank_kit import hookimpl, registry
from lowrank_kit.errors import RegistryError, UnknownNameError
from lowrank_kit.methods.base import Decomposer, Plan
from lowrank_kit.registry import ALLOW_ENV, Registry, get_registry, reset_registry


class _Fake(Decomposer):
    name = "fake"

    def decompose(self, job):
        return Plan([])


class _SvdClash(_Fake):
    name = "svd"


def _plugin(*classes):
    mod = types.ModuleType("fake_plugin")

    @hookimpl
    def register_decomposers(register):
        for cls in classes:
            register(cls)

    mod.register_decomposers = register_decomposers
    return mod


class _EP:
    """Stands in for an importlib.metadata EntryPoint."""

    def __init__(self, name, obj):
        self.name, self.value, self.dist, self._obj = name, f"{name}_module", None, obj

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


@pytest.fixture
def fake_entry_points(monkeypatch):
    eps = []
    monkeypatch.setattr(
        registry.importlib.metadata, "entry_points", lambda group: list(eps) if group == "lowrank_kit" else []
    )
    reset_registry()
    yield eps
    reset_registry()


def test_builtins_register_through_the_hooks():
    reg = get_registry()
    assert "svd" in reg.names("decomposer")
    assert reg.source_of("decomposer", "svd") == "lowrank_kit.builtin"
    assert {"llava", "llava_next", "smolvlm", "qwen2_vl", "qwen2_5_vl", "molmo2"} <= set(
        reg.names("model_adapter")
    )
    assert reg.plugins["lowrank_kit.builtin"].source == "built-in"


def test_unknown_name_lists_available():
    with pytest.raises(UnknownNameError, match=r"unknown decomposer 'nope'; available: .*svd"):
        get_registry().get("decomposer", "nope")


def test_duplicate_name_names_both_sources(fake_entry_points):
    fake_entry_points.append(_EP("clash", _plugin(_SvdClash)))
    with pytest.raises(
        RegistryError,
        match=r"'svd' is registered twice: by plugin 'lowrank_kit.builtin' and by plugin 'clash'",
    ):
        get_registry()


def test_wrong_kind_is_rejected():
    reg = Registry()
    with pytest.raises(RegistryError, match="expected a subclass of lowrank_kit.methods.base.Decomposer"):
        reg.add_plugin(_plugin(int), "bad", "test")
    reg2 = Registry()
    with pytest.raises(RegistryError, match="expected a subclass"):
        reg2.add_plugin(_plugin(Decomposer), "bad2", "test")


def test_misspelled_hook_is_caught():
    mod = types.ModuleType("typo_plugin")

    @hookimpl
    def register_decomposer(register):  # missing the final "s"
        pass

    mod.register_decomposer = register_decomposer
    with pytest.raises(Exception, match="register_decomposer"):
        Registry().add_plugin(mod, "typo", "test")


def test_external_plugin_loads_and_is_listed(fake_entry_points):
    fake_entry_points.append(_EP("fakeplug", _plugin(_Fake)))
    reg = get_registry()
    assert reg.get("decomposer", "fake") is _Fake
    assert reg.plugins["fakeplug"].registered["decomposer"] == ["fake"]
    assert reg.plugins["fakeplug"].source.startswith("entry point fakeplug")


@pytest.mark.parametrize(
    ("allow", "expected"), [(None, True), ("", False), ("other", False), ("fakeplug, other", True)]
)
def test_allow_list_variable(fake_entry_points, monkeypatch, allow, expected):
    fake_entry_points.append(_EP("fakeplug", _plugin(_Fake)))
    if allow is None:
        monkeypatch.delenv(ALLOW_ENV, raising=False)
    else:
        monkeypatch.setenv(ALLOW_ENV, allow)
    assert ("fake" in get_registry().names("decomposer")) is expected


def test_broken_plugin_is_an_error_not_a_skip(fake_entry_points):
    fake_entry_points.append(_EP("broken", ImportError("no module named missing_dep")))
    with pytest.raises(RegistryError, match=r"external plugin 'broken' .* failed to import: ImportError"):
        get_registry()
