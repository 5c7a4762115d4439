"""Calibration samples: processed image+text inputs with the answer span marked.

A :class:`CalibrationSample` is what every method that reads calibration data consumes: the model
inputs for one item (batch dimension 1) and ``labels`` for a teacher-forced cross-entropy on the
answer tokens only (prompt positions are -100; ``labels[t]`` is the token at position ``t``, and the
model's usual shift makes position ``t-1`` predict it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CalibrationSample:
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, pixel_values, ... (batch 1)
    labels: torch.Tensor  # [1, L] long; -100 everywhere but the answer tokens

    @property
    def num_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> CalibrationSample:
        """Move tensors to ``device``; floating inputs (pixel values) take ``dtype`` when given."""
        moved = {}
        for k, v in self.inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            moved[k] = v
        return CalibrationSample(moved, self.labels.to(device))
