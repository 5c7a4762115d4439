"""Decode-attention benchmark on one GPU: the latent kernel against SDPA on full K/V.

The measurement lives in :mod:`lowrank_kit.kernels.latent_attention.bench` (also behind
``lowrank bench speed``); see its docstring for what is timed and how::

    python benchmarks/attention_decode.py run --out benchmarks/results/attention_decode_h200.json --sweep
    python benchmarks/attention_decode.py plot benchmarks/results/attention_decode_h200.json docs
"""

from lowrank_kit.kernels.latent_attention.bench import main

if __name__ == "__main__":
    main()
