"""Layer-by-layer execution of a model kept in host memory (``--device-map sequential`` / ``auto``).

A model that does not fit the GPU is calibrated the way llm-compressor's sequential pipeline does it:

1. :meth:`LayerRunner.capture` runs the part of the model before the decoder (embeddings, vision tower,
   projector, rotary tables, masks) once per calibration sample, with every decoder layer's ``forward``
   replaced by a recorder that returns its input unchanged. It keeps the hidden states entering layer 0
   and the exact arguments the model passes to *each* layer (Molmo2 picks a rotary table per layer, Qwen
   a sliding or full mask per layer), and stops the forward at the last layer.
2. :meth:`LayerRunner.onload` moves one decoder layer to the execution device, the caller runs all
   samples through it (collecting whatever statistics it hooks there), and the layer goes back to the
   host. Each layer crosses the bus once per pass, not once per sample.
3. :meth:`LayerRunner.head` is the final norm and ``lm_head`` on the last hidden states.

The statistics equal those of a full forward on one device: each layer sees the same input tensors in
the same sample order, and layer ``L + 1`` reads the *uncompressed* layer ``L``'s output, as in the
in-memory path (factors are installed only after every layer is planned).

Only the embeddings, vision side and head stay on the execution device for the whole run, plus, under
``--device-map auto``, the decoder layers that fit the GPU budget: the first ones on the execution
device, the next ones on the other visible GPUs in order (:func:`plan_residency`); a resident layer runs
where it lives, its inputs moved to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_kit.errors import CalibrationError
from lowrank_kit.models.base import ModelAdapter, get_submodule


class _Captured(BaseException):
    """Raised by the last layer's recorder to stop the forward once every layer's arguments are known
    (a BaseException, so that no ``except Exception`` inside a model's forward swallows it)."""


@dataclass
class SampleInputs:
    """One calibration sample at the decoder: the hidden states entering layer 0 and each layer's
    other arguments (positional after the hidden states, then keywords)."""

    hidden: torch.Tensor
    layer_args: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def move_outside_layers(model: nn.Module, adapter: ModelAdapter, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder layer to ``device``, in place
    (parameter objects are kept, so tied weights stay tied)."""
    prefix = adapter.layers + "."
    for name, module in model.named_modules():
        if name == adapter.layers or name.startswith(prefix):
            continue
        for param in module.parameters(recurse=False):
            if param.device != device:
                param.data = param.data.to(device)
        for key, buf in list(module.named_buffers(recurse=False)):
            if buf.device != device:
                module._buffers[key] = buf.to(device)


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer returns its hidden states (transformers 5) or a tuple starting with them."""
    return out[0] if isinstance(out, tuple) else out


class LayerRunner:
    """Runs ``model``'s decoder layers one at a time on ``device`` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        device: torch.device,
        resident: list[torch.device | None] | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.device = torch.device(device)
        self.layers = adapter.decoder_layers(model)
        # Per layer: the device it stays on for the whole run, or None (streamed to ``device`` per pass).
        self.resident = list(resident) if resident is not None else [None] * len(self.layers)
        self.host = torch.device("cpu")
        self.moves = 0  # layer onloads, for the report

    @property
    def resident_layers(self) -> int:
        return sum(d is not None for d in self.resident)

    def layer_device(self, index: int) -> torch.device:
        return self.resident[index] or self.device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def prepare(self) -> None:
        """Embeddings, vision side and head on the execution device; resident layers there too."""
        move_outside_layers(self.model, self.adapter, self.device)
        for index in range(self.num_layers):
            self.layers[index].to(self.resident[index] or self.host)

    def release(self) -> None:
        """Everything back in host memory (the compressed model is saved from there)."""
        self.model.to(self.host)

    def capture(self, samples: Sequence[Any], dtype: torch.dtype) -> list[SampleInputs]:
        """Each sample's hidden states at layer 0 and every layer's arguments (see the module docstring)."""
        captured: list[SampleInputs] = []
        # An instance-level forward (e.g. an accelerate hook's) is put back as it was, else removed.
        originals = [layer.__dict__.get("forward") for layer in self.layers]
        last = self.num_layers - 1

        def recorder(index: int):
            def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
                hidden = args[0] if args else kwargs.pop("hidden_states")
                rest = args[1:] if args else ()
                entry = captured[-1]
                if index == 0:
                    entry.hidden = hidden.detach()
                entry.layer_args.append((rest, {k: v for k, v in kwargs.items()}))
                if index == last:
                    raise _Captured
                return hidden

            return forward

        try:
            for index, layer in enumerate(self.layers):
                layer.forward = recorder(index)
            with torch.no_grad():
                for sample in samples:
                    moved = sample.to(self.device, dtype=dtype)
                    captured.append(SampleInputs(hidden=torch.empty(0)))
                    try:
                        self.model(**moved.inputs, use_cache=False)
                    except _Captured:
                        pass
                    else:
                        raise CalibrationError(
                            "the model's forward did not reach its last decoder layer; layer-by-layer "
                            f"calibration cannot run {type(self.model).__name__}"
                        )
        finally:
            for layer, forward in zip(self.layers, originals, strict=True):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward
        return captured

    @contextlib.contextmanager
    def onload(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` on the execution device for the body of the ``with``.

        Calibration never writes to a layer's tensors, so offloading copies nothing back: each parameter
        and buffer simply points at its host tensor again and the device copy is freed."""
        layer = self.layers[index]
        if self.resident[index] is not None or self.device == self.host:
            yield layer
            return
        params = [(p, p.data) for p in layer.parameters()]
        buffers = [(m, name, b) for m in layer.modules() for name, b in m._buffers.items() if b is not None]
        layer.to(self.device)
        self.moves += 1
        try:
            yield layer
        finally:
            for param, data in params:
                param.data = data
            for module, name, buf in buffers:
                module._buffers[name] = buf

    def run(self, layer: nn.Module, index: int, hidden: torch.Tensor, inputs: SampleInputs) -> torch.Tensor:
        """Layer ``index`` on one sample, on the layer's device (the output stays there)."""
        args, kwargs = inputs.layer_args[index]
        device = self.layer_device(index)
        if device != self.device:
            args, kwargs = _to(args, device), _to(kwargs, device)
        return layer_output(layer(hidden.to(device), *args, **kwargs))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's output: the final norm, then ``lm_head``."""
        hidden = hidden.to(self.device)
        norm = get_submodule(self.model, self.adapter.final_norm) if self.adapter.final_norm else None
        if norm is not None:
            hidden = norm(hidden)
        return get_submodule(self.model, self.adapter.lm_head)(hidden)


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def plan_residency(sizes: list[int], budgets: list[tuple[torch.device, int]]) -> list[torch.device | None]:
    """Which device each decoder layer stays on: consecutive layers fill the first budget, then the next
    (``budgets``: (device, bytes free for layers) in order); the layers left over are streamed (None)."""
    plan: list[torch.device | None] = []
    slots = list(budgets)
    for size in sizes:
        while slots and slots[0][1] < size:
            slots.pop(0)
        if not slots:
            plan.append(None)
            continue
        device, room = slots[0]
        slots[0] = (device, room - size)
        plan.append(device)
    return plan


def resident_devices(
    model: nn.Module, adapter: ModelAdapter, placement: Any, tokens: int = 0
) -> list[torch.device | None]:
    """Where each decoder layer stays for the whole run (None: streamed to the execution device).

    ``sequential``: nowhere. ``auto`` without a GPU: the host, which is the execution device. ``auto``
    with GPUs: the execution device first, after the modules outside the decoder, one streamed layer, the
    per-layer fp32 statistics the calibrated methods may hold at once (a Gram matrix of the hidden size
    and a Fisher matrix of q/k/v per layer), the hidden states of the calibration samples' ``tokens`` (the
    streamed passes hold three such tensors per sample at once) and 2 GiB of workspace; then every other visible GPU, each keeping 2 GiB for
    activations (:func:`plan_residency`).
    """
    layers = adapter.decoder_layers(model)
    if placement.device_map == "sequential":
        return [None] * len(layers)
    device = placement.execution_device
    if device.type != "cuda":
        return [device] * len(layers)
    sizes = [_bytes(layer.parameters()) + _bytes(layer.buffers()) for layer in layers]
    outside = _bytes(model.parameters()) + _bytes(model.buffers()) - sum(sizes)
    hidden = adapter.get_projection(model, 0, "q_proj").weight.shape[-1]
    qkv = sum(adapter.get_projection(model, 0, t).weight.numel() for t in ("q_proj", "k_proj", "v_proj"))
    workspace = 2 * 2**30
    activations = 3 * tokens * hidden * next(model.parameters()).element_size()
    reserve = max(sizes) + len(layers) * (hidden * hidden + qkv) * 4 + activations + workspace
    first = device.index or 0
    budgets = [(device, placement.gpu_budget(first) - outside - reserve)]
    for index in range(torch.cuda.device_count()):
        if index != first:
            budgets.append((torch.device("cuda", index), placement.gpu_budget(index) - workspace))
    return plan_residency(sizes, budgets)
