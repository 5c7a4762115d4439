"""Per-item cache of evaluation results, keyed by everything that decides a model's answer.

One entry per (model, item, settings) holds what the model produced for that item: the generated
text and the log-probabilities of the option letters at the answer position. Its key is the sha256 of

- the model's content (:func:`lowrank_kit.calib_cache.model_digest`: config and every tensor),
- the item's content (image bytes, mode and size, question, hint, options, answer) and the model
  inputs the processor built from it (so the processor, its chat template and the prompt style are
  covered twice over), plus the prompt style by name,
- the generation settings (greedy, max_new_tokens, eos/pad ids) and the option-letter tokens read,
- lowrank_kit's, torch's and transformers' versions and the device type.

A change to any of these is a different key, so an entry is never reused for other settings. Entries
are small JSON files written to a temporary name and renamed into place; an unreadable entry (damage
from outside) is logged and computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers

import lowrank_kit
from lowrank_kit.data.items import VQAItem
from lowrank_kit.paths import cache_subdir

log = logging.getLogger(__name__)

EVAL_CACHE_VERSION = 1


def default_eval_cache_dir() -> Path:
    """``eval/`` under the lowrank_kit cache root (:func:`lowrank_kit.paths.cache_root`)."""
    return cache_subdir("eval")


def item_digest(item: VQAItem) -> str:
    """sha256 of an item's content: image pixels (with mode and size) and every text field."""
    h = hashlib.sha256()
    image = item.image
    h.update(f"{image.mode}|{image.size}|".encode())
    h.update(image.tobytes())
    text = {
        "question": item.question,
        "hint": item.hint,
        "options": list(item.options),
        "answer": item.answer,
    }
    h.update(json.dumps(text, sort_keys=True).encode())
    return h.hexdigest()


def inputs_digest(inputs: dict[str, torch.Tensor]) -> str:
    """sha256 of processor outputs (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(inputs.items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def environment_key(device: torch.device) -> dict[str, Any]:

    return {
        "eval_cache_version": EVAL_CACHE_VERSION,
        "lowrank_kit": lowrank_kit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.device(device).type,
    }


class EvalCache:
    """Evaluation results per item under ``root`` (default :func:`default_eval_cache_dir`)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_eval_cache_dir()
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = json.loads(path.read_text())
            if entry.get("key") != key:
                raise ValueError("the entry was written under another key")
            value = entry["value"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("evaluation cache entry %s is unreadable (%s); computing it again", path, err)
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: dict[str, Any], parts: dict[str, Any] | None = None) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"key": key, "parts": parts or {}, "value": value}, default=str))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
