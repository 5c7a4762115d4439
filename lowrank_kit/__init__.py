"""lowrank_kit: low-rank decomposition and quantization for vision-language models."""

__version__ = "0.1.0"
