"""Put a model back the way it was after compressing it in place, without a second copy on its device.

``bench accuracy`` compresses one loaded model per grid cell. A deep copy per cell doubles the memory on
the device; :class:`ModelSnapshot` instead records the module tree (every module's attributes, child
modules, parameter and buffer objects) and the configs' attributes, which costs no tensor memory, and
:meth:`~ModelSnapshot.restore` reinstalls them: the projections a decomposer replaced come back, and
the modules a quantizer wrapped or swapped too.

Decomposers never write to the weights they read (``Decomposer.decompose``'s contract), so that is all a
decompose-only cell needs. Quantizers do write in place (the Hadamard rotation folds into embeddings,
norms and neighbouring linears), so for those cells ``keep_values=True`` also keeps a host-memory copy of
every tensor's values, written back by ``restore``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_CONTAINERS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")
_MISSING = object()


class ModelSnapshot:
    def __init__(self, model: nn.Module, keep_values: bool = False) -> None:
        self.model = model
        self.state: list[tuple[nn.Module, dict[str, Any]]] = []
        configs: dict[int, Any] = {}
        for module in model.modules():
            attrs = {k: (copy.copy(v) if k in _CONTAINERS else v) for k, v in module.__dict__.items()}
            self.state.append((module, attrs))
            config = module.__dict__.get("config")
            if config is not None and hasattr(config, "__dict__"):
                configs[id(config)] = config
        # Configs are edited in place (e.g. tie_word_embeddings) and shared between modules: their
        # attributes are restored in place, so every module keeps pointing at the same object.
        self.configs = [(c, dict(c.__dict__)) for c in configs.values()]
        # (tensor, its value in host memory, its version counter then): a tensor written in place since has
        # another version, so only those are copied back.
        self.values: list[tuple[torch.Tensor, torch.Tensor, int]] | None = None
        if keep_values:
            seen: set[int] = set()
            self.values = []
            for tensor in [*model.parameters(), *model.buffers()]:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    self.values.append((tensor, tensor.detach().to("cpu", copy=True), tensor._version))

    def restore(self) -> None:
        for module, attrs in self.state:
            # Attributes set since (transformers marks modules whose output hooks it installed) stay.
            current = module.__dict__
            for key, value in attrs.items():
                if key in _CONTAINERS:
                    current[key] = copy.copy(value)
                elif current.get(key, _MISSING) is not value:
                    current[key] = value
        for config, attrs in self.configs:
            config.__dict__.clear()
            config.__dict__.update(attrs)
        if self.values is not None:
            with torch.no_grad():
                for i, (tensor, value, version) in enumerate(self.values):
                    if tensor._version != version:
                        tensor.copy_(value.to(tensor.device))
                        self.values[i] = (tensor, value, tensor._version)

    @contextlib.contextmanager
    def original(self) -> Iterator[nn.Module]:
        """The model as it was when recorded, for the body of the ``with`` (e.g. reference logits for a
        KL); its current state comes back afterwards."""
        current = ModelSnapshot(self.model)
        # Only the tensors changed in place since the snapshot move (both ways), not the whole model.
        changed = [(t, t.detach().to("cpu", copy=True)) for t, _, v in self.values or () if t._version != v]
        self.restore()
        try:
            yield self.model
        finally:
            current.restore()
            with torch.no_grad():
                for tensor, value in changed:
                    tensor.copy_(value.to(tensor.device))
