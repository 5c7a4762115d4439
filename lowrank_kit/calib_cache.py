"""On-disk cache of the expensive calibration products, so that an interrupted compression resumes.

A run's entries live in ``<cache dir>/<run key>/``. The run key is the sha256 of

- the model's content: every tensor of its state dict (name, dtype, shape, bytes) and its config
  (minus the path it was loaded from and the transformers version that wrote it),
- the resolved recipe (minus ``model``, which the content already pins down),
- the calibration data: every tensor of every sample,
- what changes the numbers without changing those: lowrank_kit's and torch's versions, the device type
  and the attention implementation.

Any change to one of them gives a new key, so a stale entry is never read; old run directories are left
for the user to delete. Inside a run, each entry is one safetensors file named by what produced it
(:meth:`CalibrationCache.get_or_compute`), written to a temporary file and renamed into place, so a
killed process leaves either a whole entry or none. Entries are plain tensors: no pickle.

``job.cache`` of :class:`~lowrank_kit.methods.base.DecomposeJob` / ``QuantizeJob`` holds the run's cache
(or None); methods go through :func:`cached`, which simply computes when there is no cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank_kit
from lowrank_kit.errors import LowRankError
from lowrank_kit.paths import cache_subdir

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# Test-only fault injection: with this set to N, the process kills itself with SIGKILL right after
# writing its N-th cache entry, exactly as an out-of-memory kill or `kill -9` would stop a long run.
# The resume tests use it to interrupt `lowrank compress` at a known point; nothing else reads it.
FAULT_ENV = "LOWRANK_KIT_TEST_KILL_AFTER_CACHE_WRITES"

TensorDict = dict[str, torch.Tensor]
KeyPart = str | int | float | bool | None


def default_cache_dir() -> Path:
    """``calibration/`` under the lowrank_kit cache root (:func:`lowrank_kit.paths.cache_root`)."""
    return cache_subdir("calibration")


# -- content digests -------------------------------------------------------------------------------
def _update_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        # Bytes through a uint8 view: works for bf16, which numpy cannot represent.
        flat = t.reshape(-1).contiguous().cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes())


def _plain_config(value: Any) -> Any:
    """A config dict without what depends on where or by which version it was written."""
    if isinstance(value, dict):
        return {
            k: _plain_config(v)
            for k, v in sorted(value.items())
            if k not in ("_name_or_path", "transformers_version", "_commit_hash")
        }
    if isinstance(value, list | tuple):
        return [_plain_config(v) for v in value]
    return value


def model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(_plain_config(config.to_dict()), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        _update_tensor(h, name, t)
    return h.hexdigest()


def samples_digest(samples: Iterable[Any]) -> str:
    """Digest of calibration samples (:class:`~lowrank_kit.data.calibration.CalibrationSample`)."""
    h = hashlib.sha256()
    for i, sample in enumerate(samples):
        for name, value in sorted(sample.inputs.items()):
            if isinstance(value, torch.Tensor):
                _update_tensor(h, f"{i}.{name}", value)
            else:
                h.update(f"{i}.{name}={value!r}".encode())
        _update_tensor(h, f"{i}.labels", sample.labels)
    return h.hexdigest()


def run_key(
    model: nn.Module, recipe: Any, samples: Sequence[Any] | None, device: torch.device
) -> dict[str, Any]:
    """What a run's cache key is made of (JSON-able); :func:`key_digest` turns it into the key."""

    resolved = recipe.to_dict()
    resolved.pop("model", None)
    config = getattr(model, "config", None)
    return {
        "cache_version": CACHE_VERSION,
        "lowrank_kit": lowrank_kit.__version__,
        "torch": torch.__version__,
        "device": torch.device(device).type,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "model": model_digest(model),
        "recipe": resolved,
        "calibration": samples_digest(samples or []),
        "num_samples": len(samples or []),
    }


def key_digest(parts: Any) -> str:
    """The sha256 of ``parts`` as canonical JSON: the key of a cache entry (calibration or evaluation)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# -- the cache --------------------------------------------------------------------------------------
_SAFE = re.compile(r"[^A-Za-z0-9_.=-]+")
_writes_in_process = 0


class CalibrationCache:
    """The entries of one run (one model, recipe and calibration set) under ``root``."""

    def __init__(self, root: str | Path, key: str, description: dict[str, Any] | None = None) -> None:
        self.root = Path(root).expanduser()
        self.key = key
        self.dir = self.root / key
        self.description = description or {}
        self.hits: list[str] = []
        self.misses: list[str] = []

    @classmethod
    def for_run(
        cls, root: str | Path, model: nn.Module, recipe: Any, samples: Sequence[Any] | None, device
    ) -> CalibrationCache:
        parts = run_key(model, recipe, samples, device)
        return cls(root, key_digest(parts), parts)

    def entry_path(self, key_parts: Sequence[KeyPart]) -> Path:
        # Short parts (stage, layer) make the file name readable; the digest covers all of them.
        readable = _SAFE.sub("_", "-".join(str(p) for p in key_parts if len(str(p)) <= 24))[:80].strip("_-")
        digest = key_digest(list(key_parts))[:16]
        return self.dir / f"{readable}-{digest}.safetensors"

    def has(self, key_parts: Sequence[KeyPart]) -> bool:
        return self.entry_path(key_parts).is_file()

    def get_or_compute(self, key_parts: Sequence[KeyPart], fn: Callable[[], TensorDict]) -> TensorDict:
        """The tensors stored under ``key_parts`` in this run, or ``fn()``'s, which are then stored.

        ``key_parts`` name the product within the run (stage, layer, options); the run key already
        covers model, recipe and data. ``fn`` must return a dict of tensors.
        """

        path = self.entry_path(key_parts)
        label = path.stem
        if path.is_file():
            try:
                value = load_file(str(path))
            except (SafetensorError, OSError) as err:
                # Entries are renamed into place whole, so this is damage from outside; recompute it.
                log.warning("calibration cache entry %s is unreadable (%s); computing it again", path, err)
            else:
                self.hits.append(label)
                return value
        value = fn()
        if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
            raise TypeError(f"cache entry {label}: the function must return a dict of tensors")
        self._store(path, value)
        self.misses.append(label)
        return value

    def _store(self, path: Path, value: TensorDict) -> None:

        global _writes_in_process
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            description = self.dir / "key.json"
            if not description.exists():
                _atomic_write_text(description, json.dumps(self.description, indent=2, default=str) + "\n")
            tensors = {k: v.detach().contiguous().cpu() for k, v in value.items()}
            save_file(tensors, str(tmp), metadata={"cache_version": str(CACHE_VERSION)})
            _fsync_file(tmp)
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise LowRankError(
                f"cannot write the calibration cache in {str(self.dir)!r} ({err.strerror or err}); "
                "free space, choose another --cache-dir, or pass --no-cache"
            ) from None
        _writes_in_process += 1
        limit = os.environ.get(FAULT_ENV)
        if limit and _writes_in_process >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)

    def summary(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "reused": list(self.hits), "computed": list(self.misses)}


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def cached(
    cache: CalibrationCache | None, key_parts: Sequence[KeyPart], fn: Callable[[], TensorDict]
) -> TensorDict:
    """``cache.get_or_compute(key_parts, fn)``, or just ``fn()`` when there is no cache."""
    return fn() if cache is None else cache.get_or_compute(key_parts, fn)
