"""One left-padded batch from the single-item inputs that :func:`~lowrank_kit.data.samples.prompt_inputs` builds.

Each item is processed on its own (so its tokens are exactly those calibration and training see) and
the batch is put together here. What each processor output means decides how it joins a batch, and
that is a property of the input's name, the same for every family that produces it:

- token-aligned inputs (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``token_type_ids``)
  are padded on the left, so that every row ends at its generation prompt; ``generate`` then derives
  positions from ``attention_mask`` (Qwen2-VL's M-RoPE index included);
- image inputs join along their first axis: one row per item (LLaVA ``pixel_values``, LLaVA-NeXT
  ``pixel_values`` of tiles with ``image_sizes``, SmolVLM image stacks with ``pixel_attention_mask``)
  or one row per patch or crop (Qwen2-VL ``pixel_values`` with ``image_grid_thw``, Molmo2 crops);
  shorter trailing axes are zero-padded, which is what the processors themselves do (LLaVA-NeXT and
  SmolVLM models drop all-zero tiles and images);
- Molmo2's ``image_token_pooling``: up to transformers 5.23 it indexes the flattened patches of the
  whole batch, so each item's indices are shifted by the patches of the items before it (padding
  entries stay -1); from 5.25 each image's indices address its own patches and the model shifts them,
  so they are only stacked (:func:`~lowrank_kit.models.families.molmo2.molmo2_pooling_per_image`).

An input not named here is an error rather than something silently dropped or guessed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lowrank_kit.errors import LowRankError
from lowrank_kit.models.families.molmo2 import molmo2_pooling_per_image

TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
STACK_KEYS = (
    "pixel_values",
    "image_sizes",
    "image_grid_thw",
    "pixel_attention_mask",
    "image_grids",
    "image_num_crops",
)
POOLING_KEY = "image_token_pooling"


class BatchingError(LowRankError):
    """Processor outputs that cannot be put into one batch."""


def _pad_trailing(t: torch.Tensor, shape: Sequence[int], value: float | int) -> torch.Tensor:
    pad: list[int] = []
    for have, want in zip(reversed(t.shape[1:]), reversed(shape)):
        pad += [0, want - have]
    return F.pad(t, pad, value=value) if any(pad) else t


def _stack(tensors: Sequence[torch.Tensor], value: float | int = 0) -> torch.Tensor:
    if len({t.dim() for t in tensors}) != 1:
        raise BatchingError(f"image inputs of different ranks {sorted({t.dim() for t in tensors})}")
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    return torch.cat([_pad_trailing(t, shape, value) for t in tensors])


def _patches(pixel_values: torch.Tensor) -> int:
    # Molmo2 crops are [crops, patches, dim]; pooling indices count patches over all crops.
    return int(pixel_values.shape[0] * pixel_values.shape[1]) if pixel_values.dim() >= 3 else 0


def collate(inputs: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch of single-row processor outputs (see the module docstring)."""
    if not inputs:
        raise BatchingError("no inputs to batch")
    keys = set(inputs[0])
    for i, row in enumerate(inputs):
        if set(row) != keys:
            raise BatchingError(
                f"item {i} has inputs {sorted(row)}, item 0 has {sorted(keys)}; a batch needs the same inputs"
            )
    unknown = sorted(keys - {*TOKEN_KEYS, *STACK_KEYS, POOLING_KEY})
    if unknown:
        raise BatchingError(
            f"do not know how to batch the processor outputs {', '.join(unknown)}; known: "
            f"{', '.join((*TOKEN_KEYS, *STACK_KEYS, POOLING_KEY))} (evaluate with --batch-size 1)"
        )
    if "input_ids" not in keys:
        raise BatchingError(f"the inputs have no input_ids (got {', '.join(sorted(keys))})")
    for i, row in enumerate(inputs):
        if row["input_ids"].dim() != 2 or row["input_ids"].shape[0] != 1:
            raise BatchingError(
                f"item {i}: input_ids of shape {tuple(row['input_ids'].shape)}, expected one row [1, length]"
            )
    length = max(row["input_ids"].shape[1] for row in inputs)
    batch: dict[str, torch.Tensor] = {}
    for key in TOKEN_KEYS:
        if key not in keys:
            continue
        value = pad_token_id if key == "input_ids" else 0
        rows = []
        for row in inputs:
            t = row[key]
            rows.append(F.pad(t, (length - t.shape[1], 0), value=value))
        batch[key] = torch.cat(rows)
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.cat(
            [F.pad(torch.ones_like(r["input_ids"]), (length - r["input_ids"].shape[1], 0)) for r in inputs]
        )
    for key in STACK_KEYS:
        if key in keys:
            batch[key] = _stack([row[key] for row in inputs])
    if POOLING_KEY in keys:
        shifted = [row[POOLING_KEY] for row in inputs]
        if not molmo2_pooling_per_image():
            offset = 0
            for i, row in enumerate(inputs):
                shifted[i] = torch.where(shifted[i] >= 0, shifted[i] + offset, shifted[i])
                offset += _patches(row["pixel_values"]) if "pixel_values" in row else 0
        batch[POOLING_KEY] = _stack(shifted, value=-1)
    return batch
