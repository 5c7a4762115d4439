"""Compute kernels. Each op lives in ``kernels/<op>/`` with a plain PyTorch twin (``naive.py``, the ground
truth) next to its Triton implementation (``triton.py``); Triton is imported only when a kernel runs on a
GPU or under ``TRITON_INTERPRET=1``, never by ``import lowrank_kit``."""

import os


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
