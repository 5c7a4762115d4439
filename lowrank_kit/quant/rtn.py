"""``rtn``: round-to-nearest weights with a per-channel clip search, per-token activations, K/V latents.

Weights: every linear of the language model, the low-rank factors included (``LowRankLinear.down``/
``up``, ``PerHeadLowRankLinear.down`` and ``up_weight``, ``SharedLatent.down``,
``JointLowRankProjection.up``), o_proj and the MLP, each per output channel, symmetric, with the clip
search of :func:`~lowrank_kit.quant.primitives.quantize_weight`. lm_head and the embeddings stay in
16 bits; the vision tower and projector only with ``vision: true`` (their activation clip is
``vision_act_clip``).

Activations (``act_bits`` of the scheme): the input of every quantized linear, per token, symmetric,
clip ``act_clip``. The input of a K/V up-projection is the cached latent: with ``kv_bits`` it is
quantized per (token, head group) instead (:func:`~lowrank_kit.quant.primitives.fake_quant_groups`,
the decode kernel's int8/int4 format) and the module gets ``kv_bits``; an uncompressed K/V projection
has its output quantized per (token, KV head), i.e. the full K/V treated as a latent of one group per
head.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lowrank_kit.errors import LowRankError
from lowrank_kit.methods.base import MethodConfig, QuantizeJob, Quantizer
from lowrank_kit.models.base import ModelAdapter, get_submodule, set_submodule
from lowrank_kit.modules import JointLowRankProjection, LowRankLinear, PerHeadLowRankLinear
from lowrank_kit.quant.modules import ActQuant, QuantLinear, QuantPerHeadLowRankLinear
from lowrank_kit.quant.primitives import QuantizedWeight, quantize_weight
from lowrank_kit.quant.structure import check_not_quantized

log = logging.getLogger(__name__)


class RTNConfig(MethodConfig):
    clip_search: bool = Field(True, description="per-channel weight clip search (else max scaling)")
    act_clip: float = Field(1.0, gt=0.0, le=1.0, description="activation clip ratio in the language model")
    vision: bool = Field(False, description="also quantize the vision tower and the projector")
    vision_act_clip: float = Field(
        0.9, gt=0.0, le=1.0, description="activation clip ratio in the vision tower"
    )


def _where(root: str, name: str) -> str:
    return f"{root}.{name}" if root and name else root or name


def _kv_roles(
    model: nn.Module, adapter: ModelAdapter, info, kv_bits: int | None
) -> tuple[dict[int, ActQuant], dict[int, ActQuant]]:
    """``id(linear) → latent quantization`` of the input of K/V up-projections, and of the output of
    uncompressed K/V projections."""
    inputs: dict[int, ActQuant] = {}
    outputs: dict[int, ActQuant] = {}
    if kv_bits is None:
        return inputs, outputs
    for layer in range(info.num_layers):
        for target in ("k_proj", "v_proj"):
            mod = adapter.get_projection(model, layer, target)
            if isinstance(mod, LowRankLinear | JointLowRankProjection):
                inputs[id(mod.up)] = ActQuant(kv_bits, groups=(mod.rank,))
            elif isinstance(mod, nn.Linear):
                outputs[id(mod)] = ActQuant(kv_bits, groups=(info.head_dim,) * info.num_kv_heads)
            elif not isinstance(mod, PerHeadLowRankLinear):
                raise LowRankError(
                    f"layer {layer} {target} is a {type(mod).__name__}; rtn knows the K/V latents of nn.Linear "
                    "and lowrank_kit's low-rank modules only"
                )
    return inputs, outputs


def _weight_stats(w: torch.Tensor, qw: QuantizedWeight) -> tuple[float, float]:
    ref = w.detach().float()
    err = (qw.dequantize().to(ref.device) - ref).norm() ** 2
    return float(err), float(ref.norm() ** 2)


class RTNQuantizer(Quantizer):
    name = "rtn"
    config_class = RTNConfig
    summary = "round-to-nearest: per-channel weights with clip search, per-token activations, K/V latents"

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        cfg = self.config
        model, adapter, info = job.model, job.adapter, job.info
        wbits, abits, kvbits = job.weight_bits, job.act_bits, job.kv_bits
        if wbits is None:
            raise LowRankError("rtn needs the scheme's weight bits; this scheme gives none")
        check_not_quantized(model, "rtn")
        dev = torch.device(job.device)
        lm_root = adapter.language_model
        excluded = {id(get_submodule(model, adapter.lm_head)), id(get_submodule(model, adapter.embed_tokens))}
        kv_in, kv_out = _kv_roles(model, adapter, info, kvbits)

        units: list[tuple[str, nn.Module, float]] = []
        seen: set[int] = set()
        roots = [(lm_root, cfg.act_clip)]
        if cfg.vision:
            roots += [(adapter.vision_tower, cfg.vision_act_clip), (adapter.projector, cfg.vision_act_clip)]
        for root, clip in roots:
            for name, mod in get_submodule(model, root).named_modules():
                if id(mod) in seen or id(mod) in excluded:
                    continue
                if isinstance(mod, PerHeadLowRankLinear):
                    seen.add(id(mod))
                    seen.add(id(mod.down))
                    units.append((_where(root, name), mod, clip))
                elif isinstance(mod, nn.Linear):
                    seen.add(id(mod))
                    units.append((_where(root, name), mod, clip))

        # K/V modules of the per-head layout: the latent quantization of their up input.
        per_head_kv: dict[int, ActQuant] = {}
        if kvbits is not None:
            for layer in range(info.num_layers):
                for target in ("k_proj", "v_proj"):
                    mod = adapter.get_projection(model, layer, target)
                    if isinstance(mod, PerHeadLowRankLinear):
                        per_head_kv[id(mod)] = ActQuant(kvbits, groups=tuple(mod.ranks))
        kv_modules = [
            adapter.projection_path(layer, t)
            for layer in range(info.num_layers)
            for t in ("k_proj", "v_proj")
        ]

        err_sum, ref_sum, clips, n_linear, n_per_head = 0.0, 0.0, [], 0, 0
        with job.reporter.stage("rtn: quantize weights", total=len(units)) as st:
            for path, mod, clip in units:
                act = ActQuant(abits, clip) if abits is not None else None
                if isinstance(mod, PerHeadLowRankLinear):
                    down_q = quantize_weight(mod.down.weight.to(dev), wbits, clip_search=cfg.clip_search)
                    down = QuantLinear.from_linear(
                        mod.down, q=down_q.q, scale=down_q.scale, weight_bits=wbits, input_quant=act
                    )
                    qs, scales = [], []
                    for h in range(mod.num_heads):
                        qh = quantize_weight(mod.head_up(h).to(dev), wbits, clip_search=cfg.clip_search)
                        e, r = _weight_stats(mod.head_up(h), qh)
                        err_sum, ref_sum = err_sum + e, ref_sum + r
                        clips.append(qh.clip)
                        qs.append(qh.q)
                        scales.append(qh.scale)
                    e, r = _weight_stats(mod.down.weight, down_q)
                    err_sum, ref_sum = err_sum + e, ref_sum + r
                    clips.append(down_q.clip)
                    new = QuantPerHeadLowRankLinear.from_module(
                        mod,
                        q=torch.cat(qs, dim=1),
                        scale=torch.stack(scales),
                        up_bits=wbits,
                        down=down,
                        up_input_quant=per_head_kv.get(id(mod), act),
                    )
                    n_per_head += 1
                else:
                    qw = quantize_weight(mod.weight.to(dev), wbits, clip_search=cfg.clip_search)
                    e, r = _weight_stats(mod.weight, qw)
                    err_sum, ref_sum = err_sum + e, ref_sum + r
                    clips.append(qw.clip)
                    new = QuantLinear.from_linear(
                        mod,
                        q=qw.q,
                        scale=qw.scale,
                        weight_bits=wbits,
                        input_quant=kv_in.get(id(mod), act),
                        output_quant=kv_out.get(id(mod)),
                    )
                    n_linear += 1
                set_submodule(model, path, new)
                st.advance()

        if kvbits is not None:
            for path in kv_modules:
                get_submodule(model, path).kv_bits = kvbits
        all_clips = torch.cat([c.flatten().cpu() for c in clips]) if clips else torch.ones(1)
        return {
            "weight_bits": wbits,
            "act_bits": abits,
            "kv_bits": kvbits,
            "quantized_linears": n_linear,
            "quantized_per_head_modules": n_per_head,
            "vision": cfg.vision,
            "clip_search": cfg.clip_search,
            "mean_clip_ratio": float(all_clips.mean()),
            "weight_relative_error": (err_sum / ref_sum) ** 0.5 if ref_sum else 0.0,
        }
