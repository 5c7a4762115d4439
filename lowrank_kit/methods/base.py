"""What a decomposer or a quantizer is: one config class plus one implementation.

A decomposer reads a :class:`DecomposeJob` (the model, its adapter, the targets and ratios the recipe
asks for, calibration data when it needs some) and returns a :class:`Plan`: factors per layer. It never
edits the model; :func:`lowrank_kit.surgery.apply_plan` does that, the same way for every method.

A quantizer edits the model in place through a :class:`QuantizeJob` and returns a report dict.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from lowrank_kit.modules import DenseFactors, HeadFactors, JointFactors
from lowrank_kit.progress import NULL_REPORTER, Reporter

if TYPE_CHECKING:
    from lowrank_kit.data.calibration import CalibrationSample
    from lowrank_kit.models.base import AttentionInfo, ModelAdapter


class MethodConfig(BaseModel):
    """Base of every method's parameters. ``extra="forbid"``: a misspelled parameter is an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class LayerPlan:
    """Factors for one decoder layer: per target (``DenseFactors``/``HeadFactors``), or one joint group."""

    layer: int
    factors: dict[str, DenseFactors | HeadFactors] = field(default_factory=dict)
    joint: JointFactors | None = None


@dataclass
class Plan:
    """A decomposer's output: factors for every targeted layer plus method-specific report entries."""

    layers: list[LayerPlan]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecomposeJob:
    """Everything a decomposer may read. Weights are returned as fp32 copies; the model is not modified."""

    model: nn.Module
    adapter: ModelAdapter
    info: AttentionInfo
    targets: tuple[str, ...]
    ratios: dict[str, float]  # ρ1 per target (fraction of parameters kept)
    # An explicit rank per target (per matrix, or per head for per-head layouts) instead of a ratio.
    ranks: dict[str, int] | None = None
    allocation: str = "uniform"
    granularity: int = 1
    calibration: list[CalibrationSample] | None = None
    reporter: Reporter = NULL_REPORTER
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    # Optional on-disk cache for expensive calibration products (set by the pipeline when enabled).
    cache: Any = None
    # A lowrank_kit.sequential.LayerRunner when the model stays in host memory and its decoder layers run
    # one at a time on ``device`` (--device-map sequential/auto); None: the whole model is on ``device``.
    runner: Any = None

    @property
    def layers(self) -> range:
        return range(self.info.num_layers)

    def projection(self, layer: int, target: str) -> nn.Module:
        return self.adapter.get_projection(self.model, layer, target)

    def weight(self, layer: int, target: str) -> torch.Tensor:
        """W (m×n) of one target projection as an fp32 copy on ``self.device``."""
        return self.projection(layer, target).weight.detach().to(self.device, torch.float32).clone()

    def bias(self, layer: int, target: str) -> torch.Tensor | None:
        b = getattr(self.projection(layer, target), "bias", None)
        return None if b is None else b.detach().clone()


class Decomposer(ABC):
    """Base class of decomposition methods. Subclasses set ``name``, ``config_class`` and ``summary``."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    summary: ClassVar[str] = ""
    # Whether the method reads calibration data (the pipeline errors out when a recipe has none).
    needs_calibration: ClassVar[bool] = False
    # Rank-allocation strategies this method accepts (recipe field ``rank_allocation``).
    allocations: ClassVar[tuple[str, ...]] = ("uniform",)
    # Which per-target factor layout this method produces: "dense", "per_head" or "joint".
    layout: ClassVar[str] = "dense"

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()

    @abstractmethod
    def decompose(self, job: DecomposeJob) -> Plan:
        """Return factors for every (layer, target) in ``job``; never modify ``job.model``."""


@dataclass
class QuantizeJob:
    """What a quantizer reads: the (possibly decomposed) model and the scheme's bit widths."""

    model: nn.Module
    adapter: ModelAdapter
    info: AttentionInfo
    weight_bits: int | None
    act_bits: int | None
    kv_bits: int | None
    calibration: list[CalibrationSample] | None = None
    reporter: Reporter = NULL_REPORTER
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    cache: Any = None
    runner: Any = None  # as DecomposeJob.runner


class Quantizer(ABC):
    """Base class of quantization methods; ``quantize`` edits the model in place."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    summary: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()

    @abstractmethod
    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        """Quantize ``job.model`` in place; return report entries."""
