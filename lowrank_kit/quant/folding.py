"""Where a projection's weights sit on its input and output sides, for every module kind, and in-place
fp64 transforms of them.

A linear map ``y = x Wᵀ + b`` stays the same map of rotated coordinates when its weights are rotated
to match: an input rotated by ``M`` (``x' = x M``) needs ``W' = W M``; an output to be rotated
(``y' = y M``) needs ``W' = Mᵀ W`` and ``b' = b M``. For a low-rank module ``W = A B`` the input side
is B (the down-projection, so latents ``x Bᵀ`` are unchanged by a residual rotation) and the output
side is A (the up-projection). Every transform runs in fp64 on ``device`` and is cast back to the
parameter's own dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowrank_kit.errors import LowRankError
from lowrank_kit.modules import JointLowRankProjection, LowRankLinear, PerHeadLowRankLinear


def input_weights(module: nn.Module, where: str) -> list[torch.Tensor]:
    """The weights whose columns are ``module``'s input features (a shared latent's once)."""
    if isinstance(module, nn.Linear):
        return [module.weight]
    if isinstance(module, LowRankLinear | PerHeadLowRankLinear):
        return [module.down.weight]
    if isinstance(module, JointLowRankProjection):
        return [module.shared.down.weight]
    raise LowRankError(
        f"{where} is a {type(module).__name__}, whose weights lowrank_kit cannot rotate; rotate (hadamard) "
        "before other quantizers, on a model whose projections are nn.Linear or lowrank_kit low-rank modules"
    )


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.device, param.dtype))


# Rows transformed at once: bounds the fp64 copy of a large matrix (an embedding table, lm_head).
ROW_CHUNK = 8192


def map_rows(w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
    """``w[i] ← fn(w[i])`` for every row, computed in fp64 on ``device`` a chunk of rows at a time."""
    with torch.no_grad():
        for lo in range(0, w.shape[0], ROW_CHUNK):
            rows = w[lo : lo + ROW_CHUNK]
            rows.copy_(fn(rows.detach().to(device, torch.float64)).to(w.device, w.dtype))


def rotate_input(
    module: nn.Module,
    M: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    where: str,
    done: set[int] | None = None,
    device: torch.device | None = None,
) -> None:
    """``W ← W M`` on the input side, ``M`` a matrix or a function of fp64 rows (a Kronecker transform);
    each shared weight once (``done`` holds the ids already rotated)."""
    fn = M if callable(M) else (lambda rows: rows @ M)
    dev = device if device is not None else (M.device if isinstance(M, torch.Tensor) else torch.device("cpu"))
    for w in input_weights(module, where):
        if done is not None:
            if id(w) in done:
                continue
            done.add(id(w))
        map_rows(w, fn, dev)


def rotate_output(
    linear: nn.Module,
    M: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    where: str,
    device: torch.device | None = None,
) -> None:
    """``W ← Mᵀ W``, ``b ← b M`` for a dense linear whose output is to be rotated by ``M`` (a matrix or a
    function of fp64 rows): each column ``c`` of W becomes ``cᵀ M``."""
    if not isinstance(linear, nn.Linear):
        raise LowRankError(
            f"{where} is a {type(linear).__name__}; the output side of the residual stream must be an nn.Linear"
        )
    fn = M if callable(M) else (lambda rows: rows @ M)
    dev = device if device is not None else (M.device if isinstance(M, torch.Tensor) else torch.device("cpu"))
    map_rows(linear.weight.T, fn, dev)  # the rows of Wᵀ are the columns of W
    if linear.bias is not None:
        map_rows(linear.bias.view(1, -1), fn, dev)


def rotate_output_heads(module: nn.Module, T: torch.Tensor, heads: int, where: str) -> None:
    """Rotate each head's output block by ``T`` (d × d): ``y_h ← y_h T``, for dense and low-rank K/V/Q."""
    d = T.shape[0]
    if isinstance(module, nn.Linear):
        up, bias = module.weight, module.bias
    elif isinstance(module, LowRankLinear | JointLowRankProjection):
        up, bias = module.up.weight, module.up.bias
    elif isinstance(module, PerHeadLowRankLinear):
        # up_weight is [d, Σr]: every head's A_h has the same d rows, so one left product rotates them all.
        _assign(module.up_weight, T.T @ module.up_weight.detach().to(T.device, torch.float64))
        if module.bias is not None:
            b = module.bias.detach().to(T.device, torch.float64).view(heads, d)
            _assign(module.bias, (b @ T).flatten())
        return
    else:
        raise LowRankError(f"{where} is a {type(module).__name__}, whose output lowrank_kit cannot rotate")
    W = up.detach().to(T.device, torch.float64)
    if W.shape[0] != heads * d:
        raise LowRankError(f"{where} has {W.shape[0]} outputs, expected {heads} heads × {d}")
    _assign(up, (T.T @ W.view(heads, d, -1)).reshape(W.shape))
    if bias is not None:
        _assign(bias, (bias.detach().to(T.device, torch.float64).view(heads, d) @ T).flatten())
