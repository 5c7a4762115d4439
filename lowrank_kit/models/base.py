"""Model adapters: model structure as data.

An adapter tells the algorithms where things are in one model family (decoder layers, q/k/v/o, norms,
vision tower, projector), the attention geometry (query and KV head counts, head_dim), the RoPE kind,
biases and QK-norm, and how to turn an image and a prompt into model inputs. Algorithms never branch
on the family; they read an :class:`AttentionInfo` and call the adapter's functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj")
RopeKind = Literal["default", "mrope"]
QKNormKind = Literal["per_head", "full"]


@dataclass(frozen=True)
class RopeInfo:
    """What a decode kernel needs to rebuild RoPE: ``inv_freq`` plus an attention factor."""

    kind: RopeKind
    theta: float
    parameters: dict[str, Any]
    mrope_section: tuple[int, ...] | None = None


@dataclass(frozen=True)
class AttentionInfo:
    """Geometry of the language model's attention, read from a config by an adapter."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_bias: bool
    k_bias: bool
    v_bias: bool
    rope: RopeInfo
    qk_norm: QKNormKind | None = None

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def heads_of(self, target: str) -> int:
        """Number of heads that ``target`` (q_proj / k_proj / v_proj) produces."""
        return self.num_heads if target == "q_proj" else self.num_kv_heads

    def out_features(self, target: str) -> int:
        return self.heads_of(target) * self.head_dim


def config_identity(config: Any) -> tuple[str | None, tuple[str, ...]]:
    """``(model_type, architectures)`` of a transformers config or a ``config.json`` dict."""
    if isinstance(config, dict):
        return config.get("model_type"), tuple(config.get("architectures") or ())
    return getattr(config, "model_type", None), tuple(getattr(config, "architectures", None) or ())


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted) if dotted else root


def set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(get_submodule(root, parent_name), child, module)


@dataclass(frozen=True)
class ModelAdapter:
    """Everything lowrank_kit needs to know about one model family.

    Attributes are dotted module paths relative to the top-level model (the ``...ForConditionalGeneration``
    instance). ``attention_info`` reads geometry from the model's config; ``build_inputs`` turns a
    chat (list of user/assistant turns with one image) into processor outputs.
    """

    name: str
    display_name: str
    model_class: str
    model_types: tuple[str, ...]
    layers: str
    vision_tower: str
    projector: str
    attention_info: Callable[[Any], AttentionInfo]
    attention: str = "self_attn"
    lm_head: str = "lm_head"
    language_model: str = ""
    projections: dict[str, str] = field(
        default_factory=lambda: {
            "q_proj": "q_proj",
            "k_proj": "k_proj",
            "v_proj": "v_proj",
            "o_proj": "o_proj",
        }
    )
    # Paths relative to one decoder layer (norms, MLP) and to the top-level model (embeddings, final norm).
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    mlp: dict[str, str] = field(
        default_factory=lambda: {
            "gate_proj": "mlp.gate_proj",
            "up_proj": "mlp.up_proj",
            "down_proj": "mlp.down_proj",
        }
    )
    embed_tokens: str = ""
    final_norm: str = ""
    # Post-norm layers (Molmo2 ``norm_after``) cannot have their norm gains folded into the next linear.
    norm_after: Callable[[Any], bool] = lambda config: False
    trust_remote_code: bool = False
    # Set for a family that is recognised (so the error can say why) but refused: the reason, one line.
    unsupported: str = ""
    # Inputs for generate/forward from (processor, image, messages). Default: the processor's chat template.
    build_inputs: Callable[..., dict[str, torch.Tensor]] | None = None
    # A tiny config of this family for tests and random-weight benchmarks (hidden 32-64, 2 layers).
    tiny_config: Callable[[], Any] | None = None
    # Inputs for a model of that config without a processor, from (config, batch, generator, dtype): ids with
    # the family's image placeholders and pixel tensors of the right shape; models.tiny adds attention_mask.
    tiny_inputs: Callable[[Any, int, torch.Generator, torch.dtype], dict[str, torch.Tensor]] | None = None
    description: str = ""

    @property
    def text_only(self) -> bool:
        """A language model without a vision side (``vision_tower`` empty): a tokenizer, not a processor."""
        return not self.vision_tower

    # -- structure -------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return get_submodule(model, self.layers)

    def attention_module(self, model: nn.Module, layer: int) -> nn.Module:
        return get_submodule(self.decoder_layers(model)[layer], self.attention)

    def projection_path(self, layer: int, target: str) -> str:
        if target not in self.projections:
            raise KeyError(f"unknown projection {target!r}; available: {', '.join(self.projections)}")
        return f"{self.layers}.{layer}.{self.attention}.{self.projections[target]}"

    def get_projection(self, model: nn.Module, layer: int, target: str) -> nn.Module:
        return get_submodule(model, self.projection_path(layer, target))

    def set_projection(self, model: nn.Module, layer: int, target: str, module: nn.Module) -> None:
        set_submodule(model, self.projection_path(layer, target), module)

    def info(self, model_or_config: Any) -> AttentionInfo:
        config = getattr(model_or_config, "config", model_or_config)
        return self.attention_info(config)

    def matches(self, config: Any) -> bool:
        archs = tuple(getattr(config, "architectures", None) or ())
        return getattr(config, "model_type", None) in self.model_types or self.model_class in archs
