"""Kernel tests run the Triton kernels on the GPU when there is one, else under the Triton interpreter."""

import os

import torch

# Triton reads this when a kernel is decorated, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
