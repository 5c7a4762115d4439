"""A transformers cache layer that holds latents instead of K and V.

:class:`LatentLayer` is a ``transformers.cache_utils.CacheLayerMixin``: a ``Cache`` made of these layers
(:class:`LatentCache`, or transformers' own ``DynamicCache`` whose empty layers the latent attention
swaps for latent ones on first use) goes through ``generate`` like any other cache (sequence length,
mask sizes, beam reordering, batch selection, cropping, reset). Per layer it holds, in the kernel's
packed layout (:mod:`lowrank_kit.kernels.latent_attention.layout`):

- ``k`` / ``v``: [B, capacity, row width] latents in the model dtype, or int8 with ``k_scale`` /
  ``v_scale`` [B, capacity, groups] fp32 when the modules carry ``kv_bits``; ``v`` is ``k`` itself when K
  and V share one latent (QSVD), so it is stored once;
- ``positions``: [B, capacity, 1 or 3] int32, each token's RoPE position (M-RoPE: three components);
- ``k_norm``: [B, capacity, 1 or H_kv] fp32, each token's key 1/rms (QK-norm models);
- ``starts``: [B] int32, the first cache slot each row attends to (left padding); every row ends at
  the cache length.

Capacity grows in chunks (a geometric step rounded up to ``chunk`` slots), so appending a token is one
copy into preallocated memory, not a reallocation. ``max_length`` (prompt plus new tokens, when known)
sizes the first allocation, so the cache is allocated once instead of growing by half its size (a
copy of the whole cache, and for a moment both copies in memory) when decoding passes the prompt.

A :class:`DeviceCursor` makes decode steps replayable as a CUDA graph (:mod:`lowrank_kit.runtime.graph`):
while a layer holds one, a one-token step writes its latents at the slot the cursor's device tensor
names and the kernel reads the rows' ends from the device, with its grid sized by the capacity; no
host integer of the step changes, so a captured step stays valid when replayed. The host-side
``length`` is then advanced by whoever steps the cursor (:meth:`LatentCache.advance`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lowrank_kit.kernels.latent_attention.layout import LatentKV
from lowrank_kit.runtime.convert import LatentFormat
from lowrank_kit.runtime.errors import LatentDecodeError

DEFAULT_CHUNK = 256
_TENSORS = ("k", "v", "k_scale", "v_scale", "positions", "k_norm")


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass
class DeviceCursor:
    """Where the next token goes, on the device: shared by every layer of a cache in graph mode.

    ``slot``: [1] int64, the cache slot of the next token (the cached length); ``ends``: [B] int32,
    ``slot + 1`` for every row, the end each row attends to once this step's token is appended.
    :meth:`step` advances both on the device (inside a captured graph, it is part of the replay).
    """

    slot: torch.Tensor
    ends: torch.Tensor
    # True while the graph's own step runs (eagerly or being captured); a forward into the cache at any
    # other time would write at the cursor without advancing it, so the latent attention refuses it.
    in_step: bool = False

    @classmethod
    def at(cls, length: int, batch: int, device: torch.device) -> DeviceCursor:
        return cls(
            torch.full((1,), length, dtype=torch.int64, device=device),
            torch.full((batch,), length + 1, dtype=torch.int32, device=device),
        )

    def step(self) -> None:
        self.slot.add_(1)
        self.ends.add_(1)


class LatentLayer(CacheLayerMixin):
    """One decoder layer's latent cache (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    # transformers' early initialization hands a layer fake K/V tensors; latents need the layer's format.
    supports_early_init = False

    def __init__(self, chunk: int = DEFAULT_CHUNK, max_length: int | None = None, **kwargs) -> None:
        super().__init__()
        if chunk < 1:
            raise LatentDecodeError(f"the latent cache grows by chunks of at least 1 slot, got chunk={chunk}")
        if max_length is not None and max_length < 1:
            raise LatentDecodeError(
                f"max_length is the number of tokens to allocate for (at least 1) or None, got {max_length}"
            )
        self.chunk = int(chunk)
        self.max_length = None if max_length is None else int(max_length)
        self.format: LatentFormat | None = None
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.k_norm: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None
        self.length = 0
        self.capacity = 0
        self.batch = 0
        self._ends: tuple[int, torch.Tensor] | None = None
        self.cursor: DeviceCursor | None = None
        # Bumped whenever the tensors are replaced or the length moves other than by appending, so that
        # a captured decode graph (which holds the old addresses and slot) knows it is stale.
        self.version = 0

    def __repr__(self) -> str:
        return f"LatentLayer(length={self.length}, capacity={self.capacity}, format={self.format})"

    # -- transformers' layer interface ---------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise LatentDecodeError(
            "a LatentLayer holds latents and cannot take K/V states; this attention module is not "
            "latent-enabled (call lowrank_kit.enable_latent_decode(model) or use an ordinary cache)"
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.lazy_initialization(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        # transformers 5.17 passes the query length; a tensor of cache positions has the same length.
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.length + q, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for name in _TENSORS:
            setattr(self, name, None)
        self.format, self.starts, self._ends, self.cursor = None, None, None, None
        self.length = self.capacity = self.batch = 0
        self.is_initialized = False
        self.version += 1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (negative, transformers 5.24), or keep the first
        ``tokens_to_remove`` (positive, the older convention of 5.17)."""
        n = int(tokens_to_remove)
        keep = self.length + n if n <= 0 else min(n, self.length)
        self.length = max(0, keep)
        self._ends = None
        self.cursor = None
        self.version += 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])

    def offload(self) -> None:
        self._select(lambda t: t.to("cpu", non_blocking=True), keep_batch=True)

    def prefetch(self) -> None:
        if self.is_initialized and self.k is not None and self.k.device != self.device:
            self._select(lambda t: t.to(self.device, non_blocking=True), keep_batch=True)

    def _select(self, fn, keep_batch: bool = False) -> None:
        if not self.is_initialized:
            return
        shared_v = self.v is self.k
        shared_scale = self.v_scale is self.k_scale
        for name in ("k", "k_scale", "positions", "k_norm", "starts"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self.v = self.k if shared_v else (None if self.v is None else fn(self.v))
        self.v_scale = self.k_scale if shared_scale else (None if self.v_scale is None else fn(self.v_scale))
        if not keep_batch and self.k is not None:
            self.batch = self.k.shape[0]
        self._ends = None
        self.cursor = None
        self.version += 1

    # -- the latent side -------------------------------------------------------------------------------
    def initialize(self, fmt: LatentFormat, batch: int, device: torch.device) -> None:
        """Empty cache of ``fmt`` for ``batch`` rows on ``device`` (memory is allocated on append)."""
        self.reset()
        self.format, self.batch, self.device = fmt, int(batch), device
        self.starts = torch.zeros(batch, dtype=torch.int32, device=device)
        self.is_initialized = True

    def _allocate(self, capacity: int) -> None:
        fmt, b, dev = self.format, self.batch, self.device

        def new(width: int, dtype: torch.dtype, old: torch.Tensor | None) -> torch.Tensor:
            t = torch.zeros(b, capacity, width, dtype=dtype, device=dev)
            if old is not None and self.length:
                t[:, : self.length] = old[:, : self.length]
            return t

        quant = fmt.dtype == torch.int8
        self.k = new(fmt.k_width, fmt.dtype, self.k)
        self.v = self.k if fmt.v_width is None else new(fmt.v_width, fmt.dtype, self.v)
        if quant:
            self.k_scale = new(fmt.k_groups, torch.float32, self.k_scale)
            self.v_scale = (
                self.k_scale if fmt.v_width is None else new(fmt.v_groups, torch.float32, self.v_scale)
            )
        self.positions = new(fmt.num_positions, torch.int32, self.positions)
        if fmt.norm_heads:
            self.k_norm = new(fmt.norm_heads, torch.float32, self.k_norm)
        self.capacity = capacity
        self.version += 1

    def reserve(self, n: int) -> tuple[int, int]:
        """Make room for ``n`` more tokens; returns the slot range ``[start, end)`` they go to."""
        if self.format is None:
            raise LatentDecodeError("the latent cache layer was not initialized before appending")
        need = self.length + n
        if need > self.capacity:
            grown = max(need, self.capacity + self.capacity // 2, self.max_length or 0)
            self._allocate(_round_up(grown, self.chunk))
        return self.length, need

    def commit(self, end: int) -> None:
        self.length = end
        self._ends = None

    def advance(self, n: int = 1) -> None:
        """Count ``n`` tokens that graph-mode steps wrote at the cursor (the host does not see them)."""
        if self.length + n > self.capacity:
            raise LatentDecodeError(
                f"the latent cache layer holds {self.capacity} slots; {self.length} + {n} tokens do not fit"
            )
        self.length += n
        self._ends = None

    def latent_kv(self) -> LatentKV:
        return LatentKV(self.k, self.v, self.positions, self.k_scale, self.v_scale, self.k_norm)

    def ends(self) -> torch.Tensor:
        """[B] int32 filled with the cache length (made once per length)."""
        if self._ends is None or self._ends[0] != self.length:
            self._ends = (
                self.length,
                torch.full((self.batch,), self.length, dtype=torch.int32, device=self.device),
            )
        return self._ends[1]

    def nbytes(self) -> int:
        """Bytes held by the cached tensors (allocated capacity)."""
        seen, total = set(), 0
        for name in _TENSORS:
            t = getattr(self, name)
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total


class LatentCache(Cache):
    """A transformers ``Cache`` of :class:`LatentLayer` (one per decoder layer, created as layers run).

    Pass it to ``generate(past_key_values=LatentCache())`` or let a latent-enabled model turn the empty
    layers of transformers' default ``DynamicCache`` into latent ones. ``chunk`` and ``max_length`` are
    those of every layer (see the module docstring).
    """

    def __init__(
        self, num_layers: int | None = None, chunk: int = DEFAULT_CHUNK, max_length: int | None = None
    ) -> None:
        self.chunk, self.max_length = chunk, max_length
        if num_layers is not None:
            super().__init__(layers=[self.new_layer() for _ in range(num_layers)])
        else:
            self.new_layer()  # checks chunk and max_length now rather than at the first forward
            super().__init__(layer_class_to_replicate=LatentLayer)

    def new_layer(self) -> LatentLayer:
        return LatentLayer(self.chunk, self.max_length)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, LatentLayer))

    def advance(self, n: int = 1) -> None:
        """:meth:`LatentLayer.advance` on every layer (after ``n`` graph-mode steps)."""
        for layer in self.layers:
            layer.advance(n)
