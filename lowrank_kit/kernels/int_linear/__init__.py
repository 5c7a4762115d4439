"""Linear layers computed from stored integers, with no float copy of the weights kept anywhere.

``y = x · (q · s)ᵀ``, ``q`` int8 [N, K] or packed int4 uint8 [N, ⌈K/2⌉], ``s`` fp32 [N] (one scale per
output channel). Three backends:

- ``naive`` (the CPU path and the ground truth): unpack ``q`` into a temporary of ``x``'s dtype inside the
  call, ``F.linear``, scale. The temporary is freed when the call returns, so a model holds its integers
  only; on the CPU this costs one unpack per call, which is cheap next to the GEMM.
- ``triton`` (CUDA, weight-only W8 and W4): :mod:`.triton` dequantizes tiles in registers, so decode
  reads 1 (or ½) byte per weight instead of 2.
- ``int_mm`` (CUDA, W8 with activations quantized per token to int8, more than 16 rows, K and N
  multiples of 8): ``torch._int_mm`` (cuBLASLt int8×int8 → int32 GEMM), then both scales; the prefill
  path of W8A8, where int8 tensor cores do twice the fp16 work per cycle.

``auto`` picks ``triton`` on CUDA and ``naive`` elsewhere. ``int_mm`` is never picked by ``auto``:
measured on an H100 (torch 2.11) it is slower than the fp16 GEMM at every size from 64 to 4096 rows
(4096 × 4096 at 4096 rows: 733 µs with the per-token quantization, against 199 µs for fp16 and 367 µs
for ``triton``; docs/benchmarks.md, "Integer linears"). ``LOWRANK_KIT_INT_LINEAR=naive|triton|int_mm``
forces one (for benchmarks and for comparing them); a forced backend that cannot run the call is an error,
never a quiet fallback.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from lowrank_kit.kernels import interpreting
from lowrank_kit.quant.primitives import unpack

log = logging.getLogger(__name__)

BACKENDS = ("auto", "naive", "triton", "int_mm")
ENV = "LOWRANK_KIT_INT_LINEAR"
# torch._int_mm on CUDA needs more than 16 rows (cuBLASLt's int8 GEMM).
INT_MM_MIN_ROWS = 17
# Said once per process, the first time a quantized linear runs on CUDA: integer weights save memory
# there but this kernel does not yet run faster than fp16 (nothing should be quietly slower).
SLOWER_THAN_FP16 = (
    "quantized linears on CUDA run lowrank_kit's Triton weight-only kernel, which keeps 1 (int4: 1/2) "
    "byte per weight in memory but was measured 1.1-2.2x slower than fp16 GEMMs at decode sizes on an "
    "H100 (docs/benchmarks.md, 'Integer linears'); quantize for memory, not for speed, in this version"
)
_said_slower = False


def requested_backend() -> str:
    name = os.environ.get(ENV, "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV}={name!r} is not an integer-linear backend; valid: {', '.join(BACKENDS)}")
    return name


def int_mm_applies(x: torch.Tensor, bits: int, out_features: int) -> bool:
    """Whether ``torch._int_mm`` can run this call (activations quantized per token to int8 assumed)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        x.is_cuda and bits == 8 and rows >= INT_MM_MIN_ROWS and x.shape[-1] % 8 == 0 and out_features % 8 == 0
    )


def choose_backend(x: torch.Tensor, bits: int, out_features: int, *, int8_activations: bool) -> str:
    """The backend a call runs on (see the module docstring); a forced one that cannot run is an error."""
    name = requested_backend()
    on_triton_device = x.is_cuda or interpreting()
    if name == "auto":
        if not x.is_cuda:
            return "naive"
        global _said_slower
        if not _said_slower:
            _said_slower = True
            log.warning(SLOWER_THAN_FP16)
        return "triton"
    if name == "triton" and not on_triton_device:
        raise ValueError(f"{ENV}=triton needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    if name == "int_mm" and not (int8_activations and int_mm_applies(x, bits, out_features)):
        raise ValueError(
            f"{ENV}=int_mm needs CUDA, 8-bit weights, int8 per-token activations, more than 16 rows and "
            f"K, N multiples of 8; this call has {x.device}, W{bits}, rows x width {tuple(x.shape)}, N {out_features}"
        )
    return name


def dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """The float weight ``q · s`` [N, K] (a new tensor; for inspection and folding, not for the forward)."""
    return (unpack(qweight, bits, in_features).float() * scale[:, None]).to(dtype)


def naive_int_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int
) -> torch.Tensor:
    ints = unpack(qweight, bits, in_features).to(x.dtype)  # this call's temporary
    return (F.linear(x, ints).float() * scale).to(x.dtype)


def int_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    in_features: int,
    backend: str = "naive",
) -> torch.Tensor:
    """Weight-only integer linear (no bias): ``backend`` ``naive`` or ``triton``."""
    if backend == "naive":
        return naive_int_linear(x, qweight, scale, bits, in_features)
    if backend == "triton":
        from lowrank_kit.kernels.int_linear import triton as triton_impl  # Triton: only where it runs

        return triton_impl.int_linear(x, qweight, scale, bits, in_features)
    raise ValueError(f"int_linear backend must be naive or triton, got {backend!r}")


def int8_linear(
    xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``(xq · qᵀ) · x_scale · s`` with ``xq`` int8 [..., K], ``x_scale`` fp32 [..., 1], ``q`` int8 [N, K]:
    an int32-accumulated GEMM (exact), then the two scales, in ``dtype``."""
    lead = xq.shape[:-1]
    acc = torch._int_mm(xq.reshape(-1, xq.shape[-1]), qweight.t())
    y = acc.float() * x_scale.reshape(-1, 1) * scale
    return y.to(dtype).reshape(*lead, qweight.shape[0])
