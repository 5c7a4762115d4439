"""Quantization that composes with any decomposer: schemes, quantizers (rtn, hadamard, qat), their
runtime modules and the latent-cache formats. See docs/quantization.md."""
