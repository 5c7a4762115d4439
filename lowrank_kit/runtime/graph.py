"""Decode steps of a latent-enabled model replayed from one CUDA graph.

A decode step of a 7B model is ~1500 kernel launches; issuing them from Python takes longer than the
GPU needs to run them (benchmarks/profile_decode_step.py measured 65 ms of host time against 16 ms of
kernels on an H100), so the step's speed follows the host, not the latent kernel. Capturing the step
once and replaying it removes the host from the loop::

    cache = LatentCache(max_length=prompt_len + new_tokens)
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)  # prefill
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    with LatentDecodeGraph(model, cache) as graph:
        for _ in range(new_tokens - 1):
            tok = graph.step(tok).argmax(-1, keepdim=True)

or ``enable_latent_decode(model, cuda_graph=True)`` and ``model.generate(...)``, which steps a graph
like this one inside ``generate`` (:func:`graph_forward`).

How a step stays replayable: while the graph holds the cache, every layer carries one shared
:class:`~lowrank_kit.runtime.cache.DeviceCursor`, so the latent attention writes the new token at a
slot read from the device and the kernel reads the rows' ends from the device, with its split grid
sized by the cache capacity (splits past a row's end are empty). The step's input ids and position ids
are static buffers; positions default to each row's last cached position plus one (every M-RoPE
component), as generation continues a sequence. The captured body ends by advancing the cursor and the
positions on the device; the host then advances each layer's ``length`` (one Python add per layer).

The first ``warmup`` steps run eagerly in graph mode (they compile the Triton kernels and let cuBLAS
pick its algorithms); the next one is captured and replayed, and every later one is a replay. When
the cache runs out of capacity the graph grows it (as an eager cache would) and captures again; any
other change to the cache (crop, reorder, reset) is detected through the layers' versions and also
leads to a new capture. ``use_graph=False`` runs the same graph-mode steps eagerly (what the CPU
tests check against the ordinary decode path).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from typing import Any

import torch
from torch import nn

from lowrank_kit.runtime.cache import DeviceCursor, LatentLayer
from lowrank_kit.runtime.errors import LatentDecodeError
from lowrank_kit.runtime.state import latent_state

log = logging.getLogger(__name__)


def cache_kwarg(model: Any) -> str:
    """The forward's cache argument: ``cache`` (transformers >= 5.24) or ``past_key_values`` (5.17).
    ``model``: a module or its forward."""
    params = inspect.signature(model.forward if isinstance(model, nn.Module) else model).parameters
    return "cache" if "cache" in params else "past_key_values"


def latent_layers(cache: Any) -> list[LatentLayer]:
    """The cache's layers, all of which must be initialized latent layers of one length and batch."""
    layers = getattr(cache, "layers", None)
    if not layers:
        raise LatentDecodeError(
            f"a decode graph needs a prefilled transformers Cache of latent layers, got {type(cache).__name__} "
            "with no layers; run the prompt through the latent-enabled model first"
        )
    bad = [i for i, layer in enumerate(layers) if not isinstance(layer, LatentLayer)]
    if bad:
        raise LatentDecodeError(
            f"cache layers {bad[:4]} are {type(layers[bad[0]]).__name__}, not LatentLayer: the model decoding "
            "into this cache is not latent-enabled (lowrank_kit.enable_latent_decode)"
        )
    lengths = {layer.length for layer in layers}
    batches = {layer.batch for layer in layers}
    if not all(layer.is_initialized for layer in layers) or lengths == {0}:
        raise LatentDecodeError(
            "the latent cache is empty; prefill the prompt before stepping a decode graph"
        )
    if len(lengths) != 1 or len(batches) != 1:
        raise LatentDecodeError(
            f"the cache's layers hold different lengths {sorted(lengths)} or batches {sorted(batches)}; "
            "a decode graph steps every layer by one token"
        )
    return list(layers)


class LatentDecodeGraph:
    """One-token greedy-style decode steps of ``model`` on ``cache``, replayed from a CUDA graph.

    ``model``: latent-enabled (:func:`~lowrank_kit.runtime.enable_latent_decode`) with the Triton backend
    on CUDA; ``cache``: its prefilled latent cache (``LatentCache``, or the ``DynamicCache`` whose layers
    the latent attention turned into latent ones). ``use_graph``: capture and replay (default: on CUDA);
    ``False`` runs the graph-mode step eagerly. ``warmup``: eager steps before the capture (at least 1).
    ``forward``: the callable to run (default ``model``; :func:`graph_forward` passes the unpatched one).
    See the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        cache: Any,
        *,
        use_graph: bool | None = None,
        warmup: int = 1,
        forward: Any = None,
    ) -> None:
        state = latent_state(model)
        if state is None:
            raise LatentDecodeError(
                "the model is not latent-enabled; call lowrank_kit.enable_latent_decode(model) before "
                "building a decode graph"
            )
        layers = latent_layers(cache)
        first = layers[0]
        self.device = first.k.device
        if use_graph is None:
            use_graph = self.device.type == "cuda"
        if use_graph and self.device.type != "cuda":
            raise LatentDecodeError(
                f"CUDA graphs need a CUDA cache; this one is on {self.device} (use_graph=False steps eagerly)"
            )
        if use_graph and any(rt.backend == "naive" for rt in state.layers):
            raise LatentDecodeError(
                "the naive latent-attention backend reads the cache length on the host, which a CUDA graph "
                "cannot replay; enable latent decode with backend='auto' or 'triton'"
            )
        if warmup < 1:
            raise LatentDecodeError(f"warmup must be at least 1 eager step before the capture, got {warmup}")
        self.model, self.cache, self.use_graph, self.warmup = model, cache, bool(use_graph), int(warmup)
        self._forward = forward or model
        self._kw = cache_kwarg(self._forward)
        self.batch = first.batch
        self.num_positions = first.format.num_positions
        self.steps = 0  # steps taken (eager and replayed)
        self.captures = 0  # graphs captured (a new one after the cache grew or changed)
        self._ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self._pos = self._position_buffer(first)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._pool = None
        self._logits: torch.Tensor | None = None
        self._eager = 0  # eager steps since the last (re)attach
        self._versions: list[int] = []
        self._cursor: DeviceCursor | None = None
        self._closed = False
        self._pos_given: tuple[int, ...] | None = None  # the shape of caller-given position ids
        self.output_type: type | None = None  # the forward's output class and cache field, seen eagerly
        self.cache_field = "past_key_values"
        self._attach(layers)

    # -- state ----------------------------------------------------------------------------------------
    def _position_buffer(self, first: LatentLayer) -> torch.Tensor:
        """Next positions in the layout the language model takes: [B, 1], or [3, B, 1] for M-RoPE."""
        last = first.positions[:, first.length - 1].long() + 1  # [B, npos]
        if self.num_positions == 1:
            return last[:, :1].contiguous()
        return last.T[:, :, None].contiguous()

    def _attach(self, layers: list[LatentLayer]) -> None:
        """Give every layer one cursor at the cache's length; forget any captured graph."""
        length = layers[0].length
        self._cursor = DeviceCursor.at(length, self.batch, self.device)
        for layer in layers:
            layer.cursor = self._cursor
        self._versions = [layer.version for layer in layers]
        self._graph, self._pool, self._logits, self._eager = None, None, None, 0

    def _ready(self) -> list[LatentLayer]:
        """The layers, re-attached if the cache changed and grown if the next token does not fit."""
        layers = latent_layers(self.cache)
        if layers[0].batch != self.batch:
            raise LatentDecodeError(
                f"the cache now holds {layers[0].batch} rows; this decode graph was built for {self.batch}"
            )
        stale = len(layers) != len(self._versions) or any(
            layer.version != v or layer.cursor is not self._cursor for layer, v in zip(layers, self._versions)
        )
        if layers[0].length + 1 > layers[0].capacity:
            for layer in layers:
                layer.cursor = None
                layer.reserve(1)  # grows the layer (a new allocation: the graph must be captured again)
            stale = True
        if stale:
            log.info("latent decode graph: the cache changed (length %d); capturing again", layers[0].length)
            if self._pos_given is None:
                self._pos = self._position_buffer(layers[0])
            self._attach(layers)
        return layers

    # -- stepping -------------------------------------------------------------------------------------
    def _body(self) -> torch.Tensor:
        self._cursor.in_step = True
        try:
            out = self._forward(
                input_ids=self._ids, position_ids=self._pos, use_cache=True, **{self._kw: self.cache}
            )
        finally:
            self._cursor.in_step = False
        if self.output_type is None:
            self.output_type = type(out)
            names = {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set()
            self.cache_field = "cache" if "cache" in names else "past_key_values"
        logits = out.logits[:, -1]
        self._cursor.step()
        self._pos.add_(1)
        return logits

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=pool):
                logits = self._body()
        except RuntimeError as err:
            raise LatentDecodeError(
                f"capturing the decode step as a CUDA graph failed ({str(err).splitlines()[0][:300]}); some "
                "module of this model synchronizes with the host in its forward. Decode without the graph "
                "(use_graph=False, or enable_latent_decode(..., cuda_graph=False))"
            ) from err
        self._graph, self._pool, self._logits = graph, pool, logits
        self.captures += 1

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step: ``input_ids`` [B, 1]; returns the last position's logits [B, vocab].

        ``position_ids`` (optional; [B, 1], or M-RoPE's [3, B, 1] or [4, B, 1], as the model takes them)
        override the default of each row's last cached position plus one; pass them on every step or on
        none (the graph advances its copy by one per step). With a graph the logits are a static buffer that the next step
        overwrites: clone them to keep them.
        """
        if self._closed:
            raise LatentDecodeError("this decode graph was closed; build a new one to step the cache again")
        if input_ids.shape != (self.batch, 1):
            raise LatentDecodeError(
                f"a decode step takes input_ids of shape [{self.batch}, 1], got {tuple(input_ids.shape)}"
            )
        layers = self._ready()
        self._ids.copy_(input_ids)
        if position_ids is not None:
            if self._pos_given is None:
                # The caller's layout (e.g. transformers 5.24's [4, B, 1] for Qwen2-VL: text positions
                # and the three M-RoPE components) replaces the derived one; a graph read the old buffer.
                self._pos_given = tuple(position_ids.shape)
                if self._pos_given != tuple(self._pos.shape):
                    self._pos = position_ids.to(self.device, torch.long).clone()
                    self._graph, self._pool, self._logits = None, None, None
            if tuple(position_ids.shape) != self._pos_given:
                raise LatentDecodeError(
                    f"position_ids of shape {tuple(position_ids.shape)}; earlier steps of this decode graph took "
                    f"{self._pos_given}"
                )
            self._pos.copy_(position_ids)
        if not self.use_graph:
            logits = self._body()
        elif self._eager < self.warmup:
            # Eager steps on a side stream, as CUDA graph capture wants its warm-up.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                logits = self._body()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._eager += 1
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            logits = self._logits
        for layer in layers:
            layer.advance(1)
        self.steps += 1
        return logits

    def close(self) -> None:
        """Take the cursor off the cache's layers (it decodes eagerly again) and free the graph."""
        layers = getattr(self.cache, "layers", None) or []
        for layer in layers:
            if isinstance(layer, LatentLayer) and layer.cursor is self._cursor:
                layer.cursor = None
        self._graph, self._pool, self._logits, self._cursor = None, None, None, None
        self._closed = True

    def __enter__(self) -> LatentDecodeGraph:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- inside generate ------------------------------------------------------------------------------------
GRAPH_ATTR = "_lowrank_decode_graph"
_EAGER_ONLY = ("inputs_embeds", "pixel_values", "pixel_values_videos", "labels")
_EAGER_FLAGS = ("output_attentions", "output_hidden_states")


def _graph_step_cache(kwargs: dict[str, Any], kw: str) -> Any:
    """The cache of a call that a decode graph can run (one token per row on a prefilled latent cache,
    nothing that needs the eager forward), else None."""
    ids, cache = kwargs.get("input_ids"), kwargs.get(kw)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1 or cache is None:
        return None
    if kwargs.get("use_cache") is False or any(kwargs.get(k) is not None for k in _EAGER_ONLY):
        return None
    if any(kwargs.get(k) for k in _EAGER_FLAGS) or kwargs.get("return_dict") is False:
        return None
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(layer, LatentLayer) and layer.length > 0 for layer in layers):
        return None
    return cache


def graph_forward(model: nn.Module, forward: Any, warmup: int = 1):
    """A forward for ``model`` that runs one-token decode steps on a latent cache through a
    :class:`LatentDecodeGraph` kept on the cache (so ``generate`` replays a graph), and every other call
    (prefill, images, attention outputs) through ``forward``, the model's own."""
    kw = cache_kwarg(forward)

    # generate() checks its kwargs against the forward's signature: keep the model's.
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if kw not in kwargs and "past_key_values" in kwargs:
            kwargs[kw] = kwargs.pop("past_key_values")
        cache = None if args else _graph_step_cache(kwargs, kw)
        held = getattr(kwargs.get(kw), GRAPH_ATTR, None)
        if cache is None:
            if held is not None:
                held.close()  # the eager call appends at the host-side length again
                delattr(kwargs[kw], GRAPH_ATTR)
            return forward(*args, **kwargs)
        graph = held
        if graph is None or graph._closed or graph.batch != kwargs["input_ids"].shape[0]:
            if graph is not None:
                graph.close()
            graph = LatentDecodeGraph(model, cache, warmup=warmup, forward=forward)
            setattr(cache, GRAPH_ATTR, graph)
        pos = kwargs.get("position_ids")
        logits = graph.step(kwargs["input_ids"], pos)
        return graph.output_type(logits=logits[:, None].clone(), **{graph.cache_field: cache})

    return run
