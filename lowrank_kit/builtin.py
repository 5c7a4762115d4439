"""The built-in plugin: lowrank_kit's own methods and adapters, registered through the public hooks."""

from __future__ import annotations

from lowrank_kit.hookspecs import hookimpl
from lowrank_kit.methods.asvd import ASVDDecomposer
from lowrank_kit.methods.qsvd import QSVDDecomposer
from lowrank_kit.methods.svd import SVDDecomposer
from lowrank_kit.methods.svdllm import SVDLLMDecomposer
from lowrank_kit.methods.wsvd import WSVDDecomposer
from lowrank_kit.models.families import ADAPTERS
from lowrank_kit.quant.hadamard import HadamardQuantizer
from lowrank_kit.quant.qat import QATQuantizer
from lowrank_kit.quant.rtn import RTNQuantizer


@hookimpl
def register_decomposers(register):
    for cls in (SVDDecomposer, ASVDDecomposer, SVDLLMDecomposer, QSVDDecomposer, WSVDDecomposer):
        register(cls)


@hookimpl
def register_quantizers(register):
    for cls in (RTNQuantizer, HadamardQuantizer, QATQuantizer):
        register(cls)


@hookimpl
def register_model_adapters(register):
    for adapter in ADAPTERS:
        register(adapter)
