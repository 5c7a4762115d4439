"""Perplexity of a causal language model over token windows, and its KL divergence from a reference.

The protocol SVD-LLM, ASVD and Palu report on wikitext: every window (see
:func:`lowrank_kit.data.text.token_windows`) is one forward pass, and every position but the last
predicts the next token of its window, so a window of ``T`` tokens scores ``T - 1`` predictions.
``nll`` is the mean negative log-likelihood (nats) over all predictions, ``perplexity`` its exponential.
With a reference model, ``kl`` is the mean over the same predictions of KL(reference ‖ model) between
the two next-token distributions. Any model whose forward takes ``input_ids`` and returns ``.logits``
works, a vision-language model's text-only forward included.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from lowrank_kit.eval.engine import EvaluationError
from lowrank_kit.placement import input_device
from lowrank_kit.progress import NULL_REPORTER, Reporter

log = logging.getLogger(__name__)

_MAX_EXP = math.log(torch.finfo(torch.float64).max)


def _device(model: nn.Module) -> torch.device:
    return input_device(model)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[rows, T - 1, vocab]`` logits (the model's dtype) of the next token at every position but the last."""
    ids = ids.to(_device(model))
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, :-1]


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    # float32 before the softmax: bf16 logits would put the rounding error of a large vocabulary into the NLL.
    return torch.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    reference: nn.Module | None = None,
    reference_state: Callable[[], AbstractContextManager] | None = None,
    reporter: Reporter = NULL_REPORTER,
) -> dict[str, Any]:
    """Perplexity of ``model`` over ``windows`` (``[n, T]`` token ids), ``batch_size`` windows a pass.

    Returns ``{"perplexity", "nll", "tokens", "windows", "kl"}``: ``tokens`` is the number of predicted
    tokens, ``n * (T - 1)``; ``kl`` is None without a ``reference`` or ``reference_state``. Models are used as they are (put them
    in eval mode: dropout would make the numbers random). ``reference_state`` instead of ``reference``:
    a context in which ``model`` itself is the reference (a model compressed in place, with
    :meth:`lowrank_kit.snapshot.ModelSnapshot.original`), so no second model is held.
    """
    if reference is not None and reference_state is not None:
        raise EvaluationError("give perplexity() a reference model or a reference state, not both")
    if windows.dim() != 2 or windows.dtype != torch.long:
        raise EvaluationError(
            f"perplexity needs token windows as a [n, T] long tensor, got {windows.dtype} of shape "
            f"{tuple(windows.shape)}"
        )
    n, length = windows.shape
    if n == 0 or length < 2:
        raise EvaluationError(
            f"perplexity needs at least one window of 2 or more tokens, got shape {(n, length)}"
        )
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be at least 1, got {batch_size}")
    for m in (model, reference):
        if m is not None and m.training:
            log.warning("%s is in training mode: dropout makes perplexity random", type(m).__name__)

    device = _device(model)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    with reporter.stage("perplexity", total=n) as stage:
        for start in range(0, n, batch_size):
            ids = windows[start : start + batch_size].to(device)
            logits = _logits(model, ids)
            ref_logits = None
            if reference is not None:
                ref_logits = _logits(reference, ids).to(device)
            elif reference_state is not None:
                with reference_state():
                    ref_logits = _logits(model, ids)
            # One row at a time in float32: [T - 1, vocab] instead of [batch, T - 1, vocab].
            for row in range(ids.shape[0]):
                logp = _log_softmax(logits[row])
                nll_sum -= logp.gather(-1, ids[row, 1:, None]).sum(dtype=torch.float64)
                if ref_logits is not None:
                    ref = _log_softmax(ref_logits[row])
                    p = ref.exp()
                    # A token the reference rules out (-inf logit) adds 0, not 0 * inf = nan.
                    kl_sum += torch.where(p > 0, p * (ref - logp), 0.0).sum(dtype=torch.float64)
            stage.advance(ids.shape[0])

    tokens = n * (length - 1)
    nll = float(nll_sum) / tokens
    return {
        "perplexity": math.exp(nll) if nll < _MAX_EXP else math.inf,
        "nll": nll,
        "tokens": tokens,
        "windows": n,
        "kl": float(kl_sum) / tokens if reference is not None or reference_state is not None else None,
    }
