"""The built-in plugin: lowrank_kit's own methods and adapters, registered through the public hooks."""

from __future__ import annotations

from lowrank_kit.hookspecs import hookimpl


@hookimpl
def register_decomposers(register):
    from lowrank_kit.methods.svd import SVDDecomposer

    for cls in (SVDDecomposer,):
        register(cls)


@hookimpl
def register_quantizers(register):
    for cls in ():
        register(cls)


@hookimpl
def register_model_adapters(register):
    from lowrank_kit.models.families import ADAPTERS

    for adapter in ADAPTERS:
        register(adapter)
