"""Where lowrank_kit keeps what it builds or computes once: the testbed, calibration products, eval results.

Everything lives under one root: ``$LOWRANK_KIT_CACHE`` when set, else ``$XDG_CACHE_HOME/lowrank_kit``
(``~/.cache/lowrank_kit`` by default). Each user of it takes one subdirectory (``testbed/``,
``calibration/``, ``eval/``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from lowrank_kit.errors import LowRankError

CACHE_ENV = "LOWRANK_KIT_CACHE"


def cache_root() -> Path:
    """``$LOWRANK_KIT_CACHE``, else ``$XDG_CACHE_HOME/lowrank_kit`` (``~/.cache/lowrank_kit``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lowrank_kit"


def cache_subdir(name: str) -> Path:
    """``cache_root() / name`` (not created here)."""
    return cache_root() / name


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def built_record(path: Path, required: Sequence[str], record: str) -> dict[str, Any] | str:
    """The JSON ``record`` of a directory built into the cache (the testbed, a packaged model), or why the
    directory cannot be used: not built, a ``required`` file missing, the record unreadable."""
    if not path.is_dir():
        return "not built"
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        info = json.loads((path / record).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{record} is unreadable ({err})"
    return info if isinstance(info, dict) else f"{record} is not a JSON object"


@contextlib.contextmanager
def build_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the lock for building ``path`` in the cache (its parent is created first), so that two
    processes never build it at once; the caller rechecks ``path`` inside, since another process may
    have finished it while this one waited."""
    root = path.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LowRankError(f"cannot create the {what} cache directory {str(root)!r} ({err})") from None
    with FileLock(str(root / f".{path.name}.lock")):
        yield
