"""Runtime modules of quantized models: fake-quantized linears that store their integers, and online
Hadamard transforms.

- :class:`QuantLinear` replaces an ``nn.Linear`` (a dense projection, or a low-rank factor such as
  ``LowRankLinear.down``). Its state is the integer weight (``qweight``: int8 [out, in], or packed int4
  uint8 [out, ⌈in/2⌉]) and one fp32 scale per output channel (``weight_scale``), plus the bias. The
  forward multiplies the (optionally fake-quantized) input by the integers and scales the output per
  channel, as an integer GEMM with a per-channel epilogue would.
- :class:`QuantPerHeadLowRankLinear` is a :class:`~lowrank_kit.modules.PerHeadLowRankLinear` whose
  up-projection ``up_weight`` is stored the same way (one scale per output channel, i.e. per head and
  row of ``A_h``), and whose ``down`` is a :class:`QuantLinear`.
- :class:`HadamardInput` wraps the linear after an online Hadamard (QuaRot's before ``down_proj``, and
  across heads before ``o_proj``): ``y = linear(x · (F_1 ⊗ F_2 ⊗ ...))``.

Activation quantization is described by :class:`ActQuant`: per token (one scale over the last dim,
times a clip ratio) or per (token, group) for latents (the groups of a latent-cache row).
No float copy of any integer weight is kept: the forward computes from the stored integers through
:mod:`lowrank_kit.kernels.int_linear` (on CUDA a Triton kernel that dequantizes in registers, or an
int8×int8 GEMM for W8A8 prefill; on the CPU an unpack into a temporary that the call frees).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowrank_kit.kernels.int_linear import choose_backend, dequantize, int8_linear, int_linear
from lowrank_kit.modules import PerHeadLowRankLinear
from lowrank_kit.quant.hadamard_matrices import Factor, kron_apply
from lowrank_kit.quant.primitives import (
    fake_quant_groups,
    fake_quant_tokens,
    pack,
    qmax,
    quantize_tokens,
    stored_columns,
    unpack,
)


@dataclass(frozen=True)
class ActQuant:
    """Fake quantization of activations: per token (``groups`` None) with a clip ratio, or one scale per
    (token, group) over a latent made of ``groups`` widths (clip 1: the scale is what the cache stores)."""

    bits: int
    clip: float = 1.0
    groups: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        qmax(self.bits)
        if not 0.0 < self.clip <= 1.0:
            raise ValueError(f"activation clip ratio must be in (0, 1], got {self.clip}")
        if self.groups is not None:
            object.__setattr__(self, "groups", tuple(int(g) for g in self.groups))
            if self.clip != 1.0:
                raise ValueError("per-group (latent) quantization has no clip ratio")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups is None:
            return fake_quant_tokens(x, self.bits, self.clip)
        return fake_quant_groups(x, self.groups, self.bits)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"] = None if self.groups is None else list(self.groups)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ActQuant | None:
        if d is None:
            return None
        groups = d.get("groups")
        return cls(int(d["bits"]), float(d.get("clip", 1.0)), None if groups is None else tuple(groups))


def _check_weight_bits(bits: int) -> None:
    qmax(bits)


class _FollowsDtype:
    """``compute_dtype`` (the float dtype the integer weights are unpacked to) follows ``module.to(dtype)``
    / ``.half()`` / ``.float()`` as the module's float parameters do; otherwise a compressed model moved to
    fp16 would multiply fp16 activations by fp32 weights."""

    compute_dtype: torch.dtype

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return out


class QuantLinear(_FollowsDtype, nn.Module):
    """A linear layer with integer weights and per-channel fp32 scales, fake-quantized activations.

    ``input_quant`` applies to the input (per token; or per group for a latent read from the cache),
    ``output_quant`` to the output (the K/V cache of an uncompressed projection).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        weight_bits: int,
        input_quant: ActQuant | None = None,
        output_quant: ActQuant | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_weight_bits(weight_bits)
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits = weight_bits
        self.input_quant, self.output_quant = input_quant, output_quant
        self.compute_dtype = dtype or torch.get_default_dtype()
        cols = stored_columns(in_features, weight_bits)
        stored = torch.int8 if weight_bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=stored, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        q: torch.Tensor,
        scale: torch.Tensor,
        weight_bits: int,
        input_quant: ActQuant | None = None,
        output_quant: ActQuant | None = None,
    ) -> QuantLinear:
        """Build from ``linear`` (for its shape, dtype, device and bias) with integers ``q`` (int8
        [out, in]) and ``scale`` ([out])."""
        w = linear.weight
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_bits=weight_bits,
            input_quant=input_quant,
            output_quant=output_quant,
            dtype=w.dtype,
            device=w.device,
        )
        with torch.no_grad():
            mod.qweight.copy_(pack(q.to(w.device), weight_bits))
            mod.weight_scale.copy_(scale.to(w.device, torch.float32))
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
        return mod

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``q · scale`` [out, in] (inspection and folding; the forward never builds it)."""
        return dequantize(
            self.qweight, self.weight_scale, self.weight_bits, self.in_features, self.compute_dtype
        )

    def _int8_activations(self) -> bool:
        iq = self.input_quant
        return iq is not None and iq.groups is None and iq.bits == 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = choose_backend(
            x, self.weight_bits, self.out_features, int8_activations=self._int8_activations()
        )
        if backend == "int_mm":
            xq, x_scale = quantize_tokens(x, 8, self.input_quant.clip)
            y = int8_linear(xq, x_scale, self.qweight, self.weight_scale, x.dtype)
        else:
            if self.input_quant is not None:
                x = self.input_quant(x)
            y = int_linear(x, self.qweight, self.weight_scale, self.weight_bits, self.in_features, backend)
        if self.bias is not None:
            y = y + self.bias
        if self.output_quant is not None:
            y = self.output_quant(y)
        return y

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "quant_linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "weight_bits": self.weight_bits,
            "input_quant": None if self.input_quant is None else self.input_quant.to_dict(),
            "output_quant": None if self.output_quant is None else self.output_quant.to_dict(),
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, weight_bits={self.weight_bits}, "
            f"input_quant={self.input_quant}, output_quant={self.output_quant}"
        )


class QuantPerHeadLowRankLinear(_FollowsDtype, PerHeadLowRankLinear):
    """:class:`PerHeadLowRankLinear` with a quantized up-projection and a :class:`QuantLinear` down.

    ``up_qweight`` holds the integers of ``up_weight`` (d × Σr_h; int8, or int4 packed along Σr_h) and
    ``up_scale`` (H × d, fp32) one scale per output channel: row i of head h's ``A_h``. ``up_input_quant``
    fake-quantizes the latent before the up-projection (per (token, head) for a K/V latent cache).
    ``up_weight``, ``head_up``, ``factors`` and ``weight`` return dequantized values, so everything that
    reads a :class:`PerHeadLowRankLinear` keeps working.
    """

    def __init__(
        self,
        in_features: int,
        head_dim: int,
        ranks: list[int],
        *,
        bias: bool,
        up_bits: int,
        up_input_quant: ActQuant | None = None,
        down: nn.Module | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if not ranks or min(ranks) < 1:
            raise ValueError(f"every head needs rank >= 1, got ranks {ranks}")
        _check_weight_bits(up_bits)
        self.in_features, self.head_dim = in_features, head_dim
        self.ranks = [int(r) for r in ranks]
        self.num_heads = len(self.ranks)
        self.out_features = self.num_heads * head_dim
        total = sum(self.ranks)
        offsets = [0]
        for r in self.ranks:
            offsets.append(offsets[-1] + r)
        self.offsets = offsets
        self.down = (
            down
            if down is not None
            else nn.Linear(in_features, total, bias=False, dtype=dtype, device=device)
        )
        self.up_bits = up_bits
        self.up_input_quant = up_input_quant
        self.compute_dtype = dtype or torch.get_default_dtype()
        stored = torch.int8 if up_bits == 8 else torch.uint8
        self.register_buffer(
            "up_qweight", torch.zeros(head_dim, stored_columns(total, up_bits), dtype=stored, device=device)
        )
        self.register_buffer(
            "up_scale", torch.ones(self.num_heads, head_dim, dtype=torch.float32, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device)) if bias else None
        # On the CPU explicitly: from_pretrained builds modules under a meta-device default.
        self._head_of_column = torch.repeat_interleave(
            torch.arange(self.num_heads, device="cpu"), torch.tensor(self.ranks, device="cpu")
        )

    @classmethod
    def from_module(
        cls,
        mod: PerHeadLowRankLinear,
        *,
        q: torch.Tensor,
        scale: torch.Tensor,
        up_bits: int,
        down: nn.Module,
        up_input_quant: ActQuant | None,
    ) -> QuantPerHeadLowRankLinear:
        """``q``: int8 [d, Σr] integers of ``up_weight``; ``scale``: [H, d] per head and row."""
        ref = mod.up_weight
        new = cls(
            mod.in_features,
            mod.head_dim,
            mod.ranks,
            bias=mod.bias is not None,
            up_bits=up_bits,
            up_input_quant=up_input_quant,
            down=down,
            dtype=ref.dtype,
            device=ref.device,
        )
        with torch.no_grad():
            new.up_qweight.copy_(pack(q.to(ref.device), up_bits))
            new.up_scale.copy_(scale.to(ref.device, torch.float32))
            if mod.bias is not None:
                new.bias.copy_(mod.bias)
        return new

    def int_up(self) -> torch.Tensor:
        """The integers of ``up_weight`` [d, Σr] in the compute dtype; a new tensor on every call."""
        return unpack(self.up_qweight, self.up_bits, sum(self.ranks)).to(self.compute_dtype)

    @property
    def up_weight(self) -> torch.Tensor:  # type: ignore[override]
        cols = self._head_of_column.to(self.up_scale.device)
        scale = self.up_scale[cols].T  # [d, Σr]: the scale of the head each column belongs to
        return (self.int_up().float() * scale).to(self.compute_dtype)

    def up(self, c: torch.Tensor) -> torch.Tensor:
        """Latents (..., Σr_h) → outputs (..., H·d): integer up-projection, per-channel scales, bias."""
        if self.up_input_quant is not None:
            c = self.up_input_quant(c)
        q = self.int_up()
        if self.uniform:
            r = self.ranks[0]
            cs = c.unflatten(-1, (self.num_heads, r))
            ups = q.view(self.head_dim, self.num_heads, r)
            out = torch.einsum("...hr,dhr->...hd", cs, ups).flatten(-2)
        else:
            out = torch.cat(
                [
                    c[..., self.offsets[h] : self.offsets[h + 1]]
                    @ q[:, self.offsets[h] : self.offsets[h + 1]].T
                    for h in range(self.num_heads)
                ],
                dim=-1,
            )
        out = (out.float() * self.up_scale.flatten()).to(c.dtype)
        return out + self.bias if self.bias is not None else out

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "quant_per_head",
            "in_features": self.in_features,
            "head_dim": self.head_dim,
            "ranks": list(self.ranks),
            "bias": self.bias is not None,
            "up_bits": self.up_bits,
            "up_input_quant": None if self.up_input_quant is None else self.up_input_quant.to_dict(),
        }

    def extra_repr(self) -> str:
        return super().extra_repr() + f", up_bits={self.up_bits}, up_input_quant={self.up_input_quant}"


class HadamardTransform(nn.Module):
    """``x → x · (F_1 ⊗ F_2 ⊗ ...)`` along the last dim, computed in fp32 one factor at a time.

    Each factor is a buffer: a ±1 Hadamard block as int8 (exact in any dtype; scaled by ``1/√order`` when
    applied) or, where no Hadamard matrix of that order exists, an orthonormal fp32 matrix. A factor
    marked ``identity`` is not applied (the head-dim part of the across-heads transform, folded offline).
    """

    def __init__(
        self,
        orders: list[int],
        kinds: list[str],
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if len(orders) != len(kinds) or not orders:
            raise ValueError(f"orders {orders} and kinds {kinds} must be non-empty and of one length")
        self.orders = [int(n) for n in orders]
        self.kinds = list(kinds)
        for i, (n, kind) in enumerate(zip(self.orders, self.kinds)):
            if kind == "hadamard":
                self.register_buffer(f"factor{i}", torch.zeros(n, n, dtype=torch.int8, device=device))
            elif kind == "orthogonal":
                self.register_buffer(f"factor{i}", torch.zeros(n, n, dtype=torch.float32, device=device))
            elif kind != "identity":
                raise ValueError(
                    f"unknown transform factor kind {kind!r}; expected hadamard, orthogonal, identity"
                )
        self.size = 1
        for n in self.orders:
            self.size *= n

    @classmethod
    def from_factors(cls, factors: list[Factor | None], orders: list[int]) -> HadamardTransform:
        """``factors[i]`` None marks an identity factor of ``orders[i]``."""
        kinds = ["identity" if f is None else f.kind for f in factors]
        mod = cls(orders, kinds)
        with torch.no_grad():
            for i, f in enumerate(factors):
                if f is not None:
                    getattr(mod, f"factor{i}").copy_(f.matrix.to(getattr(mod, f"factor{i}").dtype))
        return mod

    def matrices(self, device: torch.device) -> list[torch.Tensor | None]:
        """The orthonormal factors in fp32 on ``device`` (None for identity factors)."""
        out: list[torch.Tensor | None] = []
        for i, kind in enumerate(self.kinds):
            if kind == "identity":
                out.append(None)
                continue
            H = getattr(self, f"factor{i}").to(device, torch.float32)
            out.append(H * self.orders[i] ** -0.5 if kind == "hadamard" else H)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"Hadamard transform of size {self.size} got input width {x.shape[-1]}")
        return kron_apply(x.float(), self.orders, self.matrices(x.device)).to(x.dtype)

    def spec(self) -> dict[str, Any]:
        return {"orders": list(self.orders), "kinds": list(self.kinds)}

    def extra_repr(self) -> str:
        return " ⊗ ".join(f"{k}({n})" for n, k in zip(self.orders, self.kinds))


class HadamardInput(nn.Module):
    """``y = linear(hadamard(x))``: a linear whose input is rotated online; its weight has the inverse
    rotation folded in, so the pair computes what the original linear did. ``linear`` is an ``nn.Linear``
    or, after ``rtn``, a :class:`QuantLinear` (which then quantizes the rotated input)."""

    def __init__(self, hadamard: HadamardTransform, linear: nn.Module) -> None:
        super().__init__()
        self.hadamard = hadamard
        self.linear = linear
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.hadamard(x))

    def spec(self) -> dict[str, Any]:
        return {"kind": "hadamard_input", **self.hadamard.spec()}


QUANT_MODULES = (QuantLinear, QuantPerHeadLowRankLinear, HadamardInput)
