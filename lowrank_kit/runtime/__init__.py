"""Latent-attention decoding inside transformers' ``generate``.

::

    import lowrank_kit

    model = lowrank_kit.load("out/llava-wsvd-0.6").model
    lowrank_kit.enable_latent_decode(model)      # or lowrank_kit.load(path, latent_decode=True)
    out = model.generate(**inputs, max_new_tokens=64)   # the cache now holds latents

:func:`enable_latent_decode` patches each decoder layer's attention (see
:mod:`lowrank_kit.runtime.attention`); :class:`LatentCache` / :class:`LatentLayer` are the transformers
cache types that hold the latents (:mod:`lowrank_kit.runtime.cache`); :class:`LatentDecodeGraph` replays decode steps from a CUDA graph
(:mod:`lowrank_kit.runtime.graph`; ``enable_latent_decode(model, cuda_graph=True)`` does it inside
``generate``). Importing this package imports
transformers; ``import lowrank_kit`` does not.
"""

from __future__ import annotations

from lowrank_kit.runtime.attention import disable_latent_decode, enable_latent_decode, latent_decode_enabled
from lowrank_kit.runtime.cache import LatentCache, LatentLayer
from lowrank_kit.runtime.errors import LatentDecodeError
from lowrank_kit.runtime.graph import LatentDecodeGraph

__all__ = [
    "LatentCache",
    "LatentDecodeError",
    "LatentDecodeGraph",
    "LatentLayer",
    "disable_latent_decode",
    "enable_latent_decode",
    "latent_decode_enabled",
]
