"""Where lowrank_kit keeps what it builds or computes once: the testbed, calibration products, eval results.

Everything lives under one root: ``$LOWRANK_KIT_CACHE`` when set, else ``$XDG_CACHE_HOME/lowrank_kit``
(``~/.cache/lowrank_kit`` by default). Each user of it takes one subdirectory (``testbed/``,
``calibration/``, ``eval/``).
"""

from __future__ import annotations

import os
from pathlib import Path

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
