"""Latent-attention forward for compressed models, so that ``model.generate`` decodes from latents.

:func:`enable_latent_decode` patches every decoder layer's attention module (found through the model's
adapter) with a forward that:

- computes the query as the model does (``q_proj``, its q-norm for QK-norm models, RoPE from the
  ``position_embeddings`` the model passes in);
- appends this step's latents to a :class:`~lowrank_kit.runtime.cache.LatentLayer`: ``k_proj.latent(x)``
  and ``v_proj.latent(x)`` (once when K and V share a latent), packed into the kernel's layout, int8
  with per-(token, group) scales when the modules carry ``kv_bits``, each token's RoPE position and, for
  QK-norm models, its key's 1/rms (computed from the key rebuilt from the stored latent);
- prefill (or any step of more than one token): rebuilds K and V of the whole cache with the helpers of
  :mod:`lowrank_kit.kernels.latent_attention.naive` and runs SDPA with the model's mask;
- decode (one token): :func:`~lowrank_kit.kernels.latent_attention.latent_attention_decode` over the
  cached latents (Triton on CUDA, the PyTorch twin on the CPU), then each query head's V up-projection
  of its latent output (plus V's bias: the softmax weights sum to one) and ``o_proj``.

Positions come from a forward pre-hook on the language model's rotary embedding module(s), which see the
position ids the model really uses (Qwen2-VL's three M-RoPE components included); they are valid only
during a forward of the language model.

The V up-projection is applied per head at run time instead of being folded into ``o_proj``: the fold
would turn ``o_proj`` into a [hidden, H_q·r] matrix (larger than ``o_proj`` whenever the V latent is
wider than a head, as every shared latent is) and would bypass a quantized ``o_proj``; the per-head
product costs B·H_q·r·d multiply-adds per token, small next to ``o_proj``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from lowrank_kit.kernels.latent_attention import BACKENDS, latent_attention_decode
from lowrank_kit.kernels.latent_attention.naive import head_latents, rebuild_keys
from lowrank_kit.models.base import ModelAdapter, get_submodule
from lowrank_kit.models.families.common import text_config
from lowrank_kit.registry import adapter_for_config
from lowrank_kit.runtime.cache import LatentCache, LatentLayer
from lowrank_kit.runtime.convert import (
    LayerFactors,
    Materialized,
    check_geometry,
    layer_factors,
    quantize_latents,
)
from lowrank_kit.runtime.errors import LatentDecodeError
from lowrank_kit.runtime.graph import graph_forward
from lowrank_kit.runtime.rope import rope_spec
from lowrank_kit.runtime.state import STATE_ATTR, latent_state

log = logging.getLogger(__name__)


# -- positions ------------------------------------------------------------------------------------------
@dataclass
class PositionTap:
    """The position ids of the language model's current forward, as its rotary embedding received them."""

    raw: torch.Tensor | None = None
    _norm: tuple[int, int, torch.Tensor] | None = None

    def set(self, raw: torch.Tensor | None) -> None:
        self.raw, self._norm = raw, None

    def clear(self) -> None:
        self.raw, self._norm = None, None

    def token_positions(self, batch: int, length: int, npos: int) -> torch.Tensor:
        """[batch, length, npos] int32 positions of this forward's tokens."""
        raw = self.raw
        if raw is None:
            raise LatentDecodeError(
                "no position ids were seen for this forward: the latent attention reads them from the language "
                "model's rotary embedding, so run the model (generate/forward), not an attention module alone"
            )
        if self._norm is not None and self._norm[:2] == (id(raw), npos):
            p = self._norm[2]
        else:
            if raw.dim() == 3:  # [components, B, L] (M-RoPE)
                p = raw.permute(1, 2, 0)
            elif raw.dim() == 2:  # [B or 1, L]
                p = raw[..., None]
            else:
                raise LatentDecodeError(
                    f"position ids of shape {tuple(raw.shape)}; expected [B, L] or [3, B, L]"
                )
            if p.shape[-1] != npos:
                if p.shape[-1] != 1:
                    raise LatentDecodeError(
                        f"position ids have {p.shape[-1]} components but the layer's RoPE takes {npos} "
                        "(M-RoPE needs rope_parameters['mrope_section'] in the config)"
                    )
                p = p.expand(-1, -1, npos)
            p = p.to(torch.int32)
            self._norm = (id(raw), npos, p)
        if p.shape[1] != length or p.shape[0] not in (1, batch):
            raise LatentDecodeError(
                f"position ids of shape {tuple(p.shape[:2])} do not match the {batch}×{length} tokens of this step"
            )
        return p.expand(batch, -1, -1)


def _rotary_modules(lm: nn.Module) -> list[nn.Module]:
    return [m for _, m in lm.named_children() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


# -- masks ------------------------------------------------------------------------------------------------
def _allowed(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean "may attend" of a mask as transformers builds it: 4-D bool (SDPA), 4-D additive float
    (eager: 0 where allowed) or 2-D padding mask (flash attention)."""
    if mask.dtype == torch.bool:
        out = mask
    elif mask.is_floating_point():
        out = mask == 0
    else:
        out = mask != 0
    return out[..., :length]


def _row_starts(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The first slot each row attends to, from the mask of its last query token; the attended slots
    must be one run ending at the cache length (left padding), which is what decode assumes."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
        raise LatentDecodeError(
            f"latent decode reads 2-D or 4-D attention masks (sdpa, eager, flash_attention_2); got "
            f"{type(mask).__name__}{'' if not isinstance(mask, torch.Tensor) else tuple(mask.shape)}"
        )
    allowed = _allowed(mask, length)
    last = allowed[:, 0, -1, :] if allowed.dim() == 4 else allowed
    last = last.expand(batch, -1) if last.shape[0] == 1 else last
    starts = last.int().argmax(dim=-1)
    count = last.sum(dim=-1)
    ok = last.any(dim=-1) & (count == length - starts)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        raise LatentDecodeError(
            f"batch row {bad} attends to cache slots that are not one run ending at the last token; latent "
            "decode supports left padding only (tokenizer padding_side='left')"
        )
    return starts.to(torch.int32)


def _sdpa_mask(
    mask: torch.Tensor | None, q_len: int, length: int, device
) -> tuple[torch.Tensor | None, bool]:
    if mask is None:
        if q_len == length:
            return None, True
        # Queries are the last q_len of `length` tokens.
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(length, device=device)[None, :]
        return j <= i + (length - q_len), False
    allowed = _allowed(mask, length)
    if allowed.dim() == 2:  # padding mask only: add causality
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(length, device=device)[None, :]
        allowed = allowed[:, None, None, :] & (j <= i + (length - q_len))[None, None]
    return allowed, False


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout; ``cos``/``sin`` [B, L, d] as the model's rotary embedding returns."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# -- one attention module ------------------------------------------------------------------------------
@dataclass
class LatentAttention:
    """The latent forward of one decoder layer's attention module."""

    module: nn.Module
    projections: dict[str, nn.Module]
    factors: LayerFactors
    layer: int
    tap: PositionTap
    backend: str
    chunk: int
    _checked: set = field(default_factory=set, repr=False)

    def _layer_cache(self, cache: Any) -> LatentLayer:

        if cache is None:
            return LatentLayer(self.chunk)  # no cache: a throwaway one for this forward
        if isinstance(cache, LatentLayer):
            return cache
        if not isinstance(cache, Cache):
            raise LatentDecodeError(
                f"latent decode needs a transformers Cache, got {type(cache).__name__}; pass "
                "lowrank_kit.runtime.LatentCache() or let generate create its default cache"
            )
        layers = cache.layers
        if getattr(cache, "layer_class_to_replicate", None) is not None:
            # A LatentCache makes its layers with its own chunk and max_length; other caches get ours.
            make = cache.new_layer if isinstance(cache, LatentCache) else (lambda: LatentLayer(self.chunk))
            while len(layers) <= self.layer:
                layers.append(make())
        if self.layer >= len(layers):
            raise LatentDecodeError(f"the cache has {len(layers)} layers; layer {self.layer} has none")
        layer = layers[self.layer]
        if isinstance(layer, LatentLayer):
            return layer
        if type(layer) is DynamicLayer and layer.get_seq_length() == 0:
            # transformers' default cache: its empty layer becomes a latent one, so plain generate() works.
            layers[self.layer] = fresh = LatentLayer(self.chunk)
            return fresh
        raise LatentDecodeError(
            f"layer {self.layer} of the cache is a {type(layer).__name__} with "
            f"{layer.get_seq_length()} tokens of K/V; latent decode needs an empty DynamicCache or a LatentCache"
        )

    def _query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        f = self.factors
        q = self.projections["q_proj"](x)
        if f.qk_norm == "full":
            q = self.module.q_norm(q)
        q = q.view(b, n, f.num_heads, f.head_dim)
        if f.qk_norm == "per_head":
            q = self.module.q_norm(q)
        return _rotate(q.transpose(1, 2), cos, sin)  # [B, H, n, d]

    def _append(
        self, cache: LatentLayer, mat: Materialized, x: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Store this step's latents, positions (and key norms) at the end of the cache. With a device
        cursor on ``cache`` (graph mode, one token) they go to the cursor's slot and the host-side
        length is left for the cursor's owner to advance."""
        f = self.factors
        cursor = cache.cursor
        if cursor is None:
            s0, s1 = cache.reserve(x.shape[1])
            slot = None
        else:
            slot = cursor.slot  # [1] int64 on the device

        def put(dst: torch.Tensor, val: torch.Tensor, cols: torch.Tensor | None = None) -> None:
            val = val.to(dst.dtype)
            if slot is None:
                if cols is None:
                    dst[:, s0:s1] = val
                else:
                    dst[:, s0:s1, cols] = val
            elif cols is None:
                dst.index_copy_(1, slot, val)
            else:
                dst[:, slot[:, None], cols] = val

        def store(lat: torch.Tensor, pre, pack: torch.Tensor | None, quant, dst: torch.Tensor, scale_dst):
            if pre is not None:
                lat = pre(lat)
            if quant is None:
                # The cache is allocated zeroed and padding columns are never written, so the latent goes
                # straight into its columns (one launch instead of zeros, scatter and copy).
                put(dst, lat, pack)
                return
            if pack is not None:
                packed = lat.new_zeros(*lat.shape[:-1], dst.shape[-1])
                packed[..., pack] = lat
            else:
                packed = lat
            q, s = quantize_latents(packed, quant, f.bits)
            put(dst, q)
            put(scale_dst, s)

        k_lat = self.projections["k_proj"].latent(x)
        store(k_lat, f.k.pre_quant, mat.k_pack, mat.k_quant, cache.k, cache.k_scale)
        if not f.joint:
            v_lat = self.projections["v_proj"].latent(x)
            store(v_lat, f.v.pre_quant, mat.v_pack, mat.v_quant, cache.v, cache.v_scale)
        put(cache.positions, positions)
        if f.qk_norm is not None:
            # 1/rms of the key as the kernel rebuilds it: from the stored (possibly int8) latent.
            if slot is None:
                rows = cache.k[:, s0:s1]
                scale = None if cache.k_scale is None else cache.k_scale[:, s0:s1]
            else:
                rows = cache.k.index_select(1, slot)
                scale = None if cache.k_scale is None else cache.k_scale.index_select(1, slot)
            lat = head_latents(rows, mat.weights.k_layout, scale, tables=mat.k_heads)  # [B, n, H_kv, W]
            k = torch.einsum("bnhr,hrd->bnhd", lat, mat.k_up_raw[:, : lat.shape[-1]])
            if mat.k_bias_raw is not None:
                k = k + mat.k_bias_raw
            ms = k.pow(2).mean(-1) if f.qk_norm == "per_head" else k.pow(2).mean((-2, -1))[..., None]
            put(cache.k_norm, torch.rsqrt(ms + f.norm_eps))
        if slot is None:
            cache.commit(s1)

    def _values(self, cache: LatentLayer, mat: Materialized, length: int) -> torch.Tensor:
        kv = cache.latent_kv()
        scale = None if kv.v_scale is None else kv.v_scale[:, :length]
        lat = head_latents(kv.v[:, :length], mat.weights.v_layout, scale)  # [B, S, H_kv, W]
        v = torch.einsum("bshr,hrd->bhsd", lat, mat.v_up[:, : lat.shape[-1]].float())
        if mat.v_bias is not None:
            v = v + mat.v_bias.float()[None, :, None, :]
        return v

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        # transformers 5.24 names the cache `cache`, 5.17 `past_key_values`.
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        if kwargs.get("output_attentions"):
            raise LatentDecodeError(
                "latent decode does not materialize attention weights (output_attentions)"
            )
        if position_embeddings is None:
            raise LatentDecodeError(f"layer {self.layer}: the model passed no position_embeddings (cos, sin)")
        f = self.factors
        b, n, _ = hidden_states.shape
        mat = self.factors.materialize(hidden_states.device, hidden_states.dtype)
        w = mat.weights
        layer = self._layer_cache(cache)
        first = not layer.is_initialized or layer.length == 0
        if first:
            layer.initialize(mat.format, b, hidden_states.device)
        elif layer.format != mat.format or layer.batch != b:
            raise LatentDecodeError(
                f"layer {self.layer}: the cache holds {layer.batch} rows of {layer.format}; this step has {b} rows "
                f"of {mat.format} (the model's dtype or batch changed mid-generation)"
            )
        if layer.cursor is not None and (n != 1 or first or not layer.cursor.in_step):
            raise LatentDecodeError(
                f"layer {self.layer}: the cache is held by a LatentDecodeGraph, which appends one token a step "
                "at its device cursor; step it with graph.step(), or release it (graph.close()) before "
                f"running the model on this cache yourself (this forward: {n} token(s) per row)"
            )
        positions = self.tap.token_positions(b, n, w.rope.num_positions)
        cos, sin = position_embeddings
        q = self._query(hidden_states, cos, sin)
        self._append(layer, mat, hidden_states, positions)
        length = layer.length
        if first:
            layer.starts = _row_starts(attention_mask, b, length, hidden_states.device)
        if n == 1 and not first:
            out = self._decode(q[:, :, 0], layer, mat, length)  # [B, H, d]
            out = out.reshape(b, 1, f.num_heads * f.head_dim)
        else:
            keys = rebuild_keys(layer.latent_kv(), w, length).to(q.dtype)
            values = self._values(layer, mat, length).to(q.dtype)
            mask, causal = _sdpa_mask(attention_mask, n, length, q.device)
            # enable_gqa only where heads are shared: some SDPA backends refuse the flag, and the math
            # fallback would hold [B, H, n, n] scores, tens of GB for a batch of 8K-token prompts.
            gqa = f.num_heads != f.num_kv_heads
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, is_causal=causal, scale=f.scale, enable_gqa=gqa
            )
            out = out.transpose(1, 2).reshape(b, n, f.num_heads * f.head_dim)
        return self.projections["o_proj"](out.to(hidden_states.dtype)), None

    def _decode(self, q: torch.Tensor, layer: LatentLayer, mat: Materialized, length: int) -> torch.Tensor:
        f = self.factors
        key = (layer.capacity, q.dtype, q.device)
        check = key not in self._checked
        if layer.cursor is None:
            ends, max_len = layer.ends(), length
        else:
            # Graph mode: the rows' ends live on the device and the grid covers the whole capacity (the
            # splits past a row's end are empty), so no host integer of the step changes.
            ends, max_len = layer.cursor.ends, layer.capacity
        lat = latent_attention_decode(
            q.contiguous(),
            layer.latent_kv(),
            mat.weights,
            layer.starts,
            ends,
            backend=self.backend,
            max_len=max_len,
            check=check,
        )
        self._checked.add(key)
        hkv = f.num_kv_heads
        lat = lat.view(q.shape[0], hkv, f.num_heads // hkv, -1).to(mat.v_up.dtype)
        out = torch.einsum("bjqr,jrd->bjqd", lat, mat.v_up[:, : lat.shape[-1]])
        if mat.v_bias is not None:
            out = out + mat.v_bias[None, :, None, :]
        return out.reshape(q.shape[0], f.num_heads, f.head_dim)


# -- the model ------------------------------------------------------------------------------------------
@dataclass
class LatentDecodeState:
    """What :func:`enable_latent_decode` installed on a model (kept on it, removed by disable)."""

    adapter: ModelAdapter
    backend: str
    layers: list[LatentAttention]
    handles: list[Any]
    tap: PositionTap
    graph_forward: Any = None  # the model's forward while decode steps replay CUDA graphs
    speed_note: str | None = None  # why this layout decodes slower than SDPA on full K/V, where it does


def layout_speed_note(runtimes: list[Any], num_heads: int, num_kv_heads: int, head_dim: int) -> str | None:
    """Where the latent kernel was measured slower than the best SDPA on full K/V (docs/kernel.md, "What
    gets faster"), one line saying so; None for the layout it speeds up (per-head latents, one query head a
    KV head). Nothing should decode slower than the uncompressed model without saying so."""
    factors = runtimes[0].factors
    if factors.joint:
        return (
            "K and V share one joint latent (qsvd), read by every head like a shared latent through the "
            "grouped kernel, which measured 0.003-0.58x of SDPA for a shared latent on an H100 "
            "(docs/kernel.md); per-head latents (wsvd) are the layout the kernel speeds up"
        )
    if "shared" in (factors.k.kind, factors.v.kind):
        return (
            "one shared latent per projection (svd/asvd/svdllm): every head rebuilds its keys from the whole "
            "latent; decode attention measured 0.003-0.58x of SDPA on an H100 (docs/kernel.md); per-head "
            "latents (wsvd) are the layout the kernel speeds up"
        )
    if num_heads != num_kv_heads:
        return (
            f"grouped-query attention ({num_heads} query heads over {num_kv_heads} KV heads): the latent kernel "
            "measured 0.38-1.00x of SDPA on Qwen2-VL-7B's shape on an H100 (docs/kernel.md): the cache is "
            "smaller, decode attention is not faster"
        )
    full = 2 * num_kv_heads * head_dim * len(runtimes)
    kept = sum(sum(rt.factors.k.ranks) + sum(rt.factors.v.ranks) for rt in runtimes) / full
    if kept >= 0.7:
        return (
            f"the latents keep {kept:.2f} of the K/V cache: at rho2 0.7-0.9 the latent kernel measured "
            "0.55-0.88x of SDPA on an H100 (docs/kernel.md); it speeds up decode from rho2 about 0.5"
        )
    return None


def _refuse_sliding(text: Any, attn: nn.Module, layer: int) -> None:
    layer_types = getattr(text, "layer_types", None)
    kind = layer_types[layer] if layer_types and layer < len(layer_types) else "full_attention"
    window = getattr(attn, "sliding_window", None)
    if kind != "full_attention" or window is not None:
        raise LatentDecodeError(
            f"layer {layer} uses {kind if kind != 'full_attention' else 'sliding-window'} attention "
            f"(window {window}); the latent cache keeps every token, so sliding windows are not supported"
        )


def enable_latent_decode(
    model: nn.Module,
    *,
    adapter: ModelAdapter | None = None,
    backend: str = "auto",
    chunk: int = 256,
    cuda_graph: bool = False,
) -> nn.Module:
    """Make ``model`` decode from latents: returns ``model``, its attention modules patched in place.

    Every decoder layer's K and V must be low-rank modules (``wsvd``'s per-head latents, ``svd``/``asvd``/
    ``svdllm``'s one latent per projection, ``qsvd``'s joint latent); a model whose K or V is dense is
    refused. ``backend``: "auto" (Triton on CUDA, the PyTorch twin on the CPU), "triton" or "naive".
    ``chunk``: the cache grows by multiples of this many slots. ``cuda_graph``: one-token decode steps on
    a CUDA latent cache (those ``generate`` takes after the prefill) replay a captured CUDA graph
    (:mod:`lowrank_kit.runtime.graph`); needs the Triton backend. Calling it again rebuilds the runtime
    from the current weights (do that after changing them); :func:`disable_latent_decode` undoes it.
    """
    if backend not in BACKENDS:
        raise LatentDecodeError(
            f"unknown latent-attention backend {backend!r}; available: {', '.join(BACKENDS)}"
        )
    if chunk < 1:
        raise LatentDecodeError(f"chunk must be at least 1 cache slot, got {chunk}")
    if cuda_graph and backend == "naive":
        raise LatentDecodeError(
            "cuda_graph=True needs the Triton backend (the naive one reads the cache length on the host); "
            "use backend='auto' or 'triton'"
        )
    if latent_state(model) is not None:
        disable_latent_decode(model)
    adapter = adapter or adapter_for_config(model.config)
    info = adapter.info(model)
    check_geometry(info, f"model {adapter.name}")
    text = text_config(model.config)
    lm = get_submodule(model, adapter.language_model)
    rotaries = _rotary_modules(lm)
    if not rotaries:
        raise LatentDecodeError(
            f"no rotary embedding module (one with `inv_freq`) under {adapter.language_model or 'the model'}; "
            "latent decode reads token positions from it"
        )
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    tap = PositionTap()
    runtimes = []
    for layer in range(info.num_layers):
        attn = adapter.attention_module(model, layer)
        _refuse_sliding(text, attn, layer)
        projections = {
            t: adapter.get_projection(model, layer, t) for t in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        factors = layer_factors(attn, projections, layer, info, rope_spec(text, info, layer), dtype)
        runtimes.append(LatentAttention(attn, projections, factors, layer, tap, backend, chunk))

    def capture(_module, args, kwargs):
        tap.set(kwargs["position_ids"] if "position_ids" in kwargs else (args[1] if len(args) > 1 else None))

    def release(_module, _args, _kwargs, _out):
        tap.clear()

    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in rotaries]
    handles.append(lm.register_forward_hook(release, with_kwargs=True))
    for rt in runtimes:
        rt.module.forward = rt.forward
    state = LatentDecodeState(adapter, backend, runtimes, handles, tap)
    state.speed_note = layout_speed_note(runtimes, info.num_heads, info.num_kv_heads, info.head_dim)
    if state.speed_note is not None:
        log.warning("latent decode: %s", state.speed_note)
    if cuda_graph:
        state.graph_forward = model.forward = graph_forward(model, model.forward)
    setattr(model, STATE_ATTR, state)
    log.info(
        "latent decode enabled on %d layers (%s backend): K %s, V %s%s",
        len(runtimes),
        backend,
        runtimes[0].factors.k.kind,
        runtimes[0].factors.v.kind,
        ", one joint latent" if runtimes[0].factors.joint else "",
    )
    return model


def disable_latent_decode(model: nn.Module) -> nn.Module:
    """Give ``model`` its ordinary attention back (a no-op on a model without latent decode)."""
    state: LatentDecodeState | None = latent_state(model)
    if state is None:
        return model
    for h in state.handles:
        h.remove()
    for rt in state.layers:
        if rt.module.__dict__.get("forward") == rt.forward:
            del rt.module.forward
    if state.graph_forward is not None and model.__dict__.get("forward") is state.graph_forward:
        del model.forward
    delattr(model, STATE_ATTR)
    return model


def latent_decode_enabled(model: nn.Module) -> bool:
    return latent_state(model) is not None
