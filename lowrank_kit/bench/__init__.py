"""Speed benchmarks: measurements of the library, not part of it.

- :mod:`lowrank_kit.bench.kernel`: decode attention, the latent kernel against SDPA on full K/V at the
  attention shapes of real models (settings: :class:`~lowrank_kit.bench.kernel.KernelSettings`);
- :mod:`lowrank_kit.bench.e2e`: end-to-end decode tokens/s, the uncompressed model on transformers
  against the same model compressed and decoding from latents (settings:
  :class:`~lowrank_kit.bench.e2e.E2ESettings`).

The scripts in ``benchmarks/`` and ``lowrank bench speed`` parse their command lines into these settings.
This package sits just below the CLI: it may import any part of the library, and no part of the library
imports it. A benchmark reads the kernels' launch geometry from
:mod:`lowrank_kit.kernels.latent_attention.launch`, the module the kernels launch with, never a copy.
"""
