"""Where a model's weights live and where its layers run: ``--device-map``, ``--max-gpu-memory``,
``--offload-dir``.

Device maps:

- ``cpu`` / ``cuda`` / ``cuda:N``: the whole model on that device (the in-memory path).
- ``sequential``: the model stays in host memory; compression runs one decoder layer at a time on the
  execution device (the first GPU, else the CPU), so GPU memory holds one layer, the embeddings and head,
  the calibration activations and the statistics (:mod:`lowrank_kit.sequential`). It is a compression
  mode: a checkpoint larger than the GPU loads with ``auto``.
- ``auto``: as much of the model as fits ``--max-gpu-memory`` (default: the free memory of each GPU)
  stays on the GPUs. Compression keeps the decoder layers that fit resident (the execution device first,
  then the other GPUs) and streams the rest, still one layer at a time, and returns the model in host
  memory; loading hands the budget to transformers' ``device_map="auto"`` (accelerate), which spreads the
  model over every visible GPU, then host memory, then ``--offload-dir`` on disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowrank_kit.errors import LowRankError

DEVICE_MAPS = ("auto", "sequential", "cpu", "cuda", "cuda:N")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


class PlacementError(LowRankError):
    """A device map, memory budget or offload directory that cannot be used."""


def parse_memory(text: str | int, what: str = "--max-gpu-memory") -> int:
    """Bytes from ``"40GiB"``, ``"40GB"``, ``"500MiB"`` or a plain number of bytes."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", str(text).lower())
        if match is None:
            raise PlacementError(f"{what} {text!r} is not a size; give e.g. 40GiB, 40GB, 512MiB or bytes")
        value = int(float(match.group(1)) * _UNITS[match.group(2) or ""])
    if value <= 0:
        raise PlacementError(f"{what} must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class Placement:
    device_map: str = "cpu"
    max_gpu_memory: int | None = None  # bytes per GPU
    offload_dir: Path | None = None
    execution: str | None = None  # where spread layers run (default: the first GPU, else the CPU)

    @property
    def dispatched(self) -> bool:
        """``auto`` or ``sequential``: the model is not simply moved to one device."""
        return self.device_map in ("auto", "sequential")

    @property
    def execution_device(self) -> torch.device:
        if self.dispatched:
            if self.execution is not None:
                return torch.device(self.execution)
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return torch.device(self.device_map)

    def gpu_budget(self, index: int = 0) -> int | None:
        """Bytes the model may take on GPU ``index``: the budget, or that GPU's free memory."""
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(index)
        return min(free, self.max_gpu_memory) if self.max_gpu_memory is not None else free

    def max_memory(self) -> dict[Any, int] | None:
        """accelerate's ``max_memory`` for every visible GPU (None: accelerate's own default)."""
        if self.max_gpu_memory is None or not torch.cuda.is_available():
            return None
        return {i: self.max_gpu_memory for i in range(torch.cuda.device_count())}

    def describe(self) -> dict[str, Any]:
        return {
            "device_map": self.device_map,
            "execution_device": str(self.execution_device),
            "max_gpu_memory": self.max_gpu_memory,
            "offload_dir": str(self.offload_dir) if self.offload_dir is not None else None,
        }


def parse_placement(
    device_map: str | None = "cpu",
    max_gpu_memory: str | int | None = None,
    offload_dir: str | Path | None = None,
    execution_device: str | None = None,
) -> Placement:
    """Check the options together; one line naming what is wrong and what is valid.
    ``execution_device``: with ``sequential``/``auto``, the device the layers run on."""
    name = (device_map or "cpu").strip().lower()
    if execution_device is not None:
        if name not in ("auto", "sequential"):
            raise PlacementError(
                f"an execution device ({execution_device}) goes with --device-map auto or sequential, not {name!r}"
            )
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", str(execution_device).strip().lower()):
            raise PlacementError(
                f"layers run on one device: cpu, cuda, cuda:N or mps, not {str(execution_device)!r}"
            )
        parse_placement(str(execution_device).strip().lower())  # a GPU that exists
    # meta builds shapes only (parameter counts); mps is Apple's GPU.
    if name not in ("auto", "sequential", "cpu", "cuda", "meta", "mps") and not re.fullmatch(
        r"cuda:\d+", name
    ):
        raise PlacementError(f"unknown device map {device_map!r}; valid: {', '.join(DEVICE_MAPS)}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PlacementError(
                f"device map {name!r} needs a CUDA GPU and torch sees none; use cpu, or sequential/auto "
                "(which run on the CPU when there is no GPU)"
            )
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise PlacementError(f"device map {name!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    budget = parse_memory(max_gpu_memory) if max_gpu_memory is not None else None
    if budget is not None and name != "auto":
        raise PlacementError(
            "--max-gpu-memory decides how many layers stay on the GPU under --device-map auto; "
            f"it does nothing with {name!r}"
        )
    directory = Path(offload_dir).expanduser() if offload_dir is not None else None
    if directory is not None:
        if name != "auto":
            raise PlacementError(
                f"--offload-dir holds the layers that fit neither GPU nor host memory under --device-map auto; "
                f"it does nothing with {name!r}"
            )
        if directory.exists() and not directory.is_dir():
            raise PlacementError(f"--offload-dir {str(directory)!r} is a file; give a directory")
    execution = (
        str(torch.device(str(execution_device).strip().lower())) if execution_device is not None else None
    )
    return Placement(device_map=name, max_gpu_memory=budget, offload_dir=directory, execution=execution)


def resolve_placement(
    device: str | torch.device | None = None,
    device_map: str | None = None,
    max_gpu_memory: str | int | None = None,
    offload_dir: str | Path | None = None,
) -> Placement:
    """``device`` alone (one device), or ``device_map`` with its budget options; with ``sequential`` or
    ``auto``, ``device`` names the device the layers run on (default: the first GPU)."""
    spread = device_map is not None and device_map.strip().lower() in ("auto", "sequential")
    device = str(device) if device is not None else None
    if device is not None and device_map is not None and not spread and _same(device, device_map) is False:
        raise PlacementError(
            f"--device {device} and --device-map {device_map} contradict each other; give --device-map only"
        )
    if device_map is None and (max_gpu_memory is not None or offload_dir is not None):
        raise PlacementError("--max-gpu-memory and --offload-dir go with --device-map auto")
    return parse_placement(
        device_map or device or "cpu", max_gpu_memory, offload_dir, device if spread else None
    )


def _same(a: str, b: str) -> bool | None:
    """Whether two device names are one device (``cuda`` is ``cuda:0``); None when either is no device."""
    try:
        da, db = torch.device(a.strip().lower()), torch.device(b.strip().lower())
    except RuntimeError:
        return None
    return da.type == db.type and (da.index or 0) == (db.index or 0)


def as_placement(device: str | torch.device | Placement | None) -> Placement:
    if isinstance(device, Placement):
        return device
    return parse_placement(str(device) if device is not None else "cpu")


def from_pretrained_kwargs(placement: Placement) -> dict[str, Any]:
    """What ``from_pretrained`` needs to spread a model by ``placement`` through accelerate (``auto``);
    empty for a single device (the caller moves the model). ``sequential`` is a compression mode."""
    if placement.device_map == "sequential":
        raise PlacementError(
            "--device-map sequential runs compression one decoder layer at a time; to load a model larger "
            "than the GPU use --device-map auto with --max-gpu-memory (and --offload-dir)"
        )
    if placement.device_map != "auto":
        return {}
    chosen = placement.execution
    if chosen is not None and torch.cuda.is_available() and _same(chosen, "cuda:0") is False:
        raise PlacementError(
            f"with --device-map auto accelerate places the model over every visible GPU, so --device "
            f"{placement.execution} cannot choose one; restrict the GPUs with CUDA_VISIBLE_DEVICES instead"
        )
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise PlacementError(
            "--device-map auto spreads the model through accelerate, which is not installed; "
            "pip install accelerate (or lowrank_kit[real])"
        )
    kwargs: dict[str, Any] = {"device_map": "auto"}
    budget = placement.max_memory()
    if budget is not None:
        from accelerate.utils import get_max_memory

        kwargs["max_memory"] = {**budget, "cpu": get_max_memory()["cpu"]}
    if placement.offload_dir is not None:
        placement.offload_dir.mkdir(parents=True, exist_ok=True)
        kwargs["offload_folder"] = str(placement.offload_dir)
    return kwargs


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: its first parameter's device, or for a model spread by accelerate the
    first accelerator in its device map (its hooks move activations between devices from there)."""
    mapping = getattr(model, "hf_device_map", None)
    if mapping:
        for device in mapping.values():
            if device not in ("cpu", "disk", "meta"):
                return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return torch.device("cpu")
    return next(model.parameters()).device
