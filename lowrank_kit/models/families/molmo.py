"""The older remote-code Molmo: recognised, so that loading it is an error that says why, but refused.

Its remote code fuses q, k and v into one ``att_proj`` linear per block and rotates interleaved pairs, so
there are no separate q_proj/k_proj/v_proj modules for the decomposition to replace.
"""

from __future__ import annotations

from typing import Any

from lowrank_kit.errors import ModelLoadError
from lowrank_kit.models.base import AttentionInfo, ModelAdapter

MOLMO_REMOTE_REASON = (
    "the remote-code Molmo (model_type 'molmo', MolmoForCausalLM) is recognised but not supported, even with "
    "--trust-remote-code: its code fuses q, k and v into one `att_proj` linear per block "
    "(model.transformer.blocks.N.att_proj) and rotates interleaved pairs, so there are no q_proj/k_proj/v_proj "
    "modules to decompose; use Molmo2 instead (alias molmo2-8b)"
)


def _molmo_refused(config: Any) -> AttentionInfo:
    raise ModelLoadError(MOLMO_REMOTE_REASON)


molmo = ModelAdapter(
    name="molmo",
    display_name="Molmo (remote code)",
    model_class="MolmoForCausalLM",
    model_types=("molmo",),
    # Paths of the public remote code (modeling_molmo.py of allenai/Molmo-7B-D-0924), for the record.
    layers="model.transformer.blocks",
    attention="",
    projections={"qkv_proj": "att_proj"},
    input_norm="attn_norm",
    post_attention_norm="ff_norm",
    mlp={"up_gate_proj": "ff_proj", "down_proj": "ff_out"},
    embed_tokens="model.transformer.wte",
    final_norm="model.transformer.ln_f",
    lm_head="model.transformer.ff_out",
    vision_tower="model.vision_backbone",
    projector="model.vision_backbone.image_projector",
    attention_info=_molmo_refused,
    trust_remote_code=True,
    unsupported=MOLMO_REMOTE_REASON,
    description="older remote-code Molmo; refused: q/k/v are fused into att_proj",
)

ADAPTERS = (molmo,)
