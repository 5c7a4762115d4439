"""Quantization schemes: named presets of the quantize step.

A scheme name is ``w<W>a<A>`` (weight and activation bits) with optional suffixes ``-kv8``/``-kv4``
(latent K/V cache bits) and ``-qat`` (WSVD's local QAT before rounding), in that order, e.g.
``w8a8-kv8-qat``. The base schemes and the quantizers each one runs, in order:

| scheme | weights | activations | methods | why |
|---|---|---|---|---|
| ``w8a16`` | int8 | 16 bit | rtn | 8-bit weights alone are near-lossless with RTN; no online transforms |
| ``w4a16`` | int4 | 16 bit | hadamard, rtn | 4-bit RTN needs outlier-free (rotated) weights |
| ``w8a8`` | int8 | int8 per token | hadamard, rtn | the paper's WSVD setting; rotation removes activation outliers |
| ``w8a4`` | int8 | int4 per token | hadamard, rtn | the paper's baseline comparison (Table 2) |
| ``w4a4`` | int4 | int4 per token | hadamard, rtn | QuaRot |

``-qat`` inserts ``qat`` before ``rtn`` (after ``hadamard``, so that QAT sees the rotated factors).
Without ``-kvN`` the latent cache stays in 16 bits. A recipe may override ``methods`` to run another
sequence under the same bits (e.g. ``methods: [rtn]`` for W4A4 without rotation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowrank_kit.errors import UnknownNameError

# (weight bits, activation bits or None) → methods, in order.
BASE_SCHEMES: dict[str, tuple[int, int | None, tuple[str, ...]]] = {
    "w8a8": (8, 8, ("hadamard", "rtn")),
    "w4a4": (4, 4, ("hadamard", "rtn")),
    "w8a4": (8, 4, ("hadamard", "rtn")),
    "w4a16": (4, None, ("hadamard", "rtn")),
    "w8a16": (8, None, ("rtn",)),
}
KV_BITS = (8, 4)
_NAME = re.compile(r"^(?P<base>w\d+a\d+)(?:-kv(?P<kv>\d+))?(?P<qat>-qat)?$")


@dataclass(frozen=True)
class QuantScheme:
    name: str
    methods: tuple[str, ...]
    weight_bits: int
    act_bits: int | None
    kv_bits: int | None
    qat: bool = False

    @property
    def cache_bits(self) -> int:
        """Bits per cached latent element (16 when the latent cache is not quantized)."""
        return self.kv_bits if self.kv_bits is not None else 16

    def describe(self) -> dict:
        return {
            "scheme": self.name,
            "methods": list(self.methods),
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "kv_bits": self.kv_bits,
        }


def valid_schemes() -> str:
    return (
        f"{', '.join(BASE_SCHEMES)}, each optionally followed by -kv8 or -kv4 (latent cache bits) and then "
        "-qat (e.g. w8a8-kv8-qat)"
    )


def resolve_scheme(name: str) -> QuantScheme:
    """The scheme ``name`` stands for; an unknown name is an error that lists the valid ones."""
    m = _NAME.match(name.strip().lower()) if isinstance(name, str) else None
    if m is None or m["base"] not in BASE_SCHEMES or (m["kv"] is not None and int(m["kv"]) not in KV_BITS):
        raise UnknownNameError(f"unknown quantization scheme {name!r}; valid: {valid_schemes()}")
    wbits, abits, methods = BASE_SCHEMES[m["base"]]
    kv = int(m["kv"]) if m["kv"] is not None else None
    qat = m["qat"] is not None
    if qat:
        methods = (*methods[:-1], "qat", methods[-1])
    canonical = m["base"] + (f"-kv{kv}" if kv is not None else "") + ("-qat" if qat else "")
    return QuantScheme(canonical, methods, wbits, abits, kv, qat)
