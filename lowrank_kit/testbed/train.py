"""Training the testbed model from nothing, and scoring it.

Training samples are :func:`lowrank_kit.data.samples.make_sample` outputs: the exact prompt (chat
template, image tokens, VLMEvalKit multiple-choice text) that calibration and evaluation send, with
the loss on the assistant's answer. Everything that can change the weights is fixed: the seed of the
initialisation and of the batch order, the number of CPU threads, and deterministic algorithms.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lowrank_kit.data.calibration import CalibrationSample
from lowrank_kit.data.items import VQAItem
from lowrank_kit.data.samples import prompt_inputs
from lowrank_kit.data.synthetic import CATEGORIES, CELL, GRID, IMAGE_SIZE, quarter
from lowrank_kit.errors import LowRankError, unknown_name
from lowrank_kit.models.base import TARGETS
from lowrank_kit.models.families.llava import llava
from lowrank_kit.progress import NULL_REPORTER, Reporter
from lowrank_kit.testbed.processor import IMAGE

log = logging.getLogger(__name__)

MAX_LENGTH = 256


@dataclass(frozen=True)
class TrainSettings:
    """How one testbed size is trained."""

    train_items: int
    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float
    min_lr_fraction: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    # Additional distinct training items of one category, ``(category, n)``: the next items of the
    # train split in that category after the first ``train_items``. Categories the model learns
    # quickly saturate early; the hard one gets more of the training steps.
    extra_items: tuple[tuple[str, int], ...] = ()
    # Train each attention head's Q, K and V weights with orthonormal rows times one learned scale
    # (:class:`FlatSpectrum`), so that every singular direction of a head carries the same weight.
    flat_qkv: bool = False
    # The heads' initial singular value under flat_qkv; None: the initial weights' row norm.
    flat_scale_init: float | None = None

    def __post_init__(self) -> None:

        for category, _ in self.extra_items:
            if category not in CATEGORIES:
                raise unknown_name("testbed category (extra_items)", category, CATEGORIES)


@contextlib.contextmanager
def deterministic(threads: int | None) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count for the duration; the caller's are restored."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


class FlatSpectrum(nn.Module):
    """Parametrization of a ``(heads * head_dim, in)`` weight: per head, orthonormal rows times a scale.

    ``W_h = s_h * Q_h^T`` with ``Q_h`` the (sign-fixed) QR factor of the head's unconstrained block,
    so each head's singular values are all ``s_h``. A briefly trained small model otherwise puts its
    attention into a handful of large singular directions above an init-noise floor, and truncating
    the floor (all a rank cut removes) costs nothing; pretrained VLMs use the whole spectrum of their
    projections. With a flat spectrum the weights alone no longer say which directions matter, the
    activations do: plain ``svd`` loses accuracy as the rank falls, activation-aware methods keep it.
    Removed after training (:func:`release_flat_spectrum`): the saved model is a plain LLaVA.
    """

    def __init__(self, weight: torch.Tensor, head_dim: int, scale: float | None = None) -> None:
        super().__init__()
        out_features = weight.shape[0]
        if out_features % head_dim:
            raise LowRankError(f"flat_qkv: {out_features} output features are not whole heads of {head_dim}")
        self.head_dim = head_dim
        heads = out_features // head_dim
        norms = weight.detach().view(heads, head_dim, -1).norm(dim=-1).mean(dim=-1)
        if scale is not None:
            norms = torch.full_like(norms, scale)
        self.log_scale = nn.Parameter(norms.clamp_min(1e-6).log())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        heads = self.log_scale.numel()
        blocks = weight.view(heads, self.head_dim, -1)
        q, r = torch.linalg.qr(blocks.transpose(1, 2))  # (heads, in, head_dim), (heads, head_dim, head_dim)
        sign = torch.sign(torch.diagonal(r, dim1=1, dim2=2))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        rows = (q * sign[:, None, :]).transpose(1, 2)
        return (rows * self.log_scale.exp()[:, None, None]).reshape(weight.shape)


def _attention_projections(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer's q/k/v_proj, found through the llava adapter (the testbed is a LLaVA)."""

    layers = llava.info(model).num_layers
    return [llava.get_projection(model, i, t) for i in range(layers) for t in TARGETS]


def constrain_flat_spectrum(model: nn.Module, scale: float | None = None) -> None:
    """Register :class:`FlatSpectrum` on every decoder layer's q/k/v_proj weight."""

    head_dim = model.config.text_config.head_dim
    for module in _attention_projections(model):
        parametrize.register_parametrization(module, "weight", FlatSpectrum(module.weight, head_dim, scale))


def release_flat_spectrum(model: nn.Module) -> None:
    """Replace each parametrized weight by its current value (a plain parameter again)."""

    for module in _attention_projections(model):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


@dataclass
class Supervision:
    """Auxiliary targets of one training sample: at ``positions[k]``, token ``tokens[k]`` with ``weights[k]``.

    A position with several target tokens (a soft target) spreads a total weight of 1 over them.
    ``groups[k]`` says which auxiliary loss the entry belongs to (see :data:`AUX_GROUPS`).
    """

    positions: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor
    groups: torch.Tensor


# Image positions say what is in their cell and which quarter the cell is in; the last word of a
# phrase naming one object says the same of that object; the question's last token says the answer.
AUX_GROUPS = ("image", "reference", "question")


def supervision(sample: CalibrationSample, item: VQAItem, tokenizer: Any) -> Supervision:
    """Auxiliary targets of a testbed item, at positions whose outputs no prompt reads at inference.

    Only the answer position is ever scored; the other positions' next-token outputs are free, and
    training them on the intermediate results of the question (what each image cell holds and where,
    what the answer is) gives every step of the reasoning its own gradient, which cuts the
    training the model needs by a large factor.
    """

    ids = sample.inputs["input_ids"][0].tolist()
    tok = tokenizer.convert_tokens_to_ids
    entries: list[tuple[int, list[int], int]] = []

    image_id = tok(IMAGE)
    first = ids.index(image_id)
    cells = {(o["row"], o["col"]): o for o in item.extra["scene"]}
    if (IMAGE_SIZE // CELL) != GRID or ids[first : first + GRID * GRID] != [image_id] * (GRID * GRID):
        raise LowRankError(f"item {item.index!r}: the prompt does not hold one image token per grid cell")
    for k in range(GRID * GRID):
        obj = cells.get(divmod(k, GRID))
        # Empty cells get no target: "nothing here" on most cells would teach the tower one constant.
        if obj is not None:
            entries.append((first + k, [tok(w) for w in properties(obj)], 0))

    question_end = _find(ids, tokenizer.encode(item.question, add_special_tokens=False), first, item)
    t = question_end - len(tokenizer.encode(item.question, add_special_tokens=False)) + 1
    for phrase, index in item.extra["refs"]:
        end = _find(ids, tokenizer.encode(phrase, add_special_tokens=False), t, item)
        words = [item.answer_text] if index is None else properties(item.extra["scene"][index])
        entries.append((end, [tok(w) for w in words], 1))
        t = end + 1
    entries.append((question_end, tokenizer.encode(item.answer_text, add_special_tokens=False), 2))

    positions, tokens, weights, groups = [], [], [], []
    for position, targets, group in entries:
        for token in targets:
            positions.append(position)
            tokens.append(token)
            weights.append(1.0 / len(targets))
            groups.append(group)
    return Supervision(
        torch.tensor(positions), torch.tensor(tokens), torch.tensor(weights), torch.tensor(groups)
    )


def properties(obj: dict) -> list[str]:
    """The words an image cell's (or a reference's) auxiliary target spreads over: what and where."""

    return [obj["colour"], obj["shape"], obj["size"], quarter(obj["row"], obj["col"])]


def _find(ids: list[int], pattern: list[int], start: int, item: VQAItem) -> int:
    """The position of the last token of the first occurrence of ``pattern`` at or after ``start``."""
    n = len(pattern)
    for t in range(start, len(ids) - n + 1):
        if ids[t : t + n] == pattern:
            return t + n - 1
    raise LowRankError(f"item {item.index!r}: the prompt does not contain the expected tokens {pattern}")


def collate(samples: Sequence[CalibrationSample], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch: input_ids, attention_mask, pixel_values, labels (-100 on padding)."""
    length = max(s.num_tokens for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    for row, s in enumerate(samples):
        n = s.num_tokens
        ids[row, :n] = s.inputs["input_ids"][0]
        mask[row, :n] = s.inputs["attention_mask"][0]
        labels[row, :n] = s.labels[0]
    pixels = torch.cat([s.inputs["pixel_values"] for s in samples])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


def readout_layers(num_layers: int) -> dict[str, int]:
    """The hidden state each auxiliary group is also read out from (index into ``hidden_states``).

    Each step of the reasoning is supervised at the depth where the next step needs it, through the
    final norm and the (tied) unembedding, as a logit lens reads it: the image features as they enter
    the decoder already name what their cell holds (so a question's words can match them by content);
    the last word of a phrase naming an object ("red circle") knows that object's properties after
    two layers (one to gather the phrase's words, one to look up the cell holding both); the answer's
    word is at the end of the question one layer later, which leaves the layers after it to match it
    to an option and copy that option's letter. Without this, each step can only start learning once
    the steps after it carry its gradient, and the small testbed does not reach 90% in its 5-minute
    budget.
    """
    return {"image": 0, "reference": min(2, num_layers), "question": min(3, num_layers)}


def training_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    aux: Sequence[Supervision],
    hidden_states: Sequence[torch.Tensor] | None = None,
    readout: Any = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on the answer span (make_sample's labels) plus the mean of each auxiliary group.

    Each group is scored on the final logits and, when ``hidden_states`` and ``readout`` (a function
    from hidden states to logits) are given, also at its :func:`readout_layers` depth. Returns the loss
    and its parts (``answer`` and one per :data:`AUX_GROUPS` entry, at the final layer) as floats.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    V = logp.shape[-1]
    loss = nn.functional.nll_loss(logp[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    dev = logp.device
    rows = torch.cat([torch.full_like(a.positions, r) for r, a in enumerate(aux)]).to(dev)
    positions = torch.cat([a.positions for a in aux]).to(dev)
    tokens = torch.cat([a.tokens for a in aux]).to(dev)
    weights = torch.cat([a.weights for a in aux]).to(dev)
    groups = torch.cat([a.groups for a in aux]).to(dev)
    picked = -logp[rows, positions, tokens] * weights
    parts = {"answer": loss.item()}
    depths = readout_layers(len(hidden_states) - 1) if hidden_states is not None else {}
    for g, name in enumerate(AUX_GROUPS):
        in_group = groups == g
        total = weights[in_group].sum().clamp_min(1e-9)
        part = picked[in_group].sum() / total
        parts[name] = part.item()
        loss = loss + part
        if name in depths and readout is not None:
            h = hidden_states[depths[name]][rows[in_group], positions[in_group]]
            early = torch.log_softmax(readout(h).float(), dim=-1)
            idx = torch.arange(len(h), device=dev)
            loss = loss + (-early[idx, tokens[in_group]] * weights[in_group]).sum() / total
    return loss, parts


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_fraction`` of the peak."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    floor = settings.min_lr_fraction
    return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: nn.Module,
    samples: Sequence[CalibrationSample],
    aux: Sequence[Supervision],
    settings: TrainSettings,
    *,
    pad_id: int,
    seed: int,
    device: torch.device | str = "cpu",
    reporter: Reporter = NULL_REPORTER,
    name: str = "testbed: train",
) -> dict[str, Any]:
    """Train ``model`` in place on ``samples``; returns the loss curve and timing."""
    device = torch.device(device)
    model.to(device).train()
    if settings.flat_qkv:
        constrain_flat_spectrum(model, settings.flat_scale_init)
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        # Norm gains, biases and embeddings are not decayed (the usual transformer recipe), nor are
        # flat-spectrum weights (their scale is normalised away; decay would only raise their step).
        skip = p.ndim < 2 or "embed" in pname or "norm" in pname or "parametrizations" in pname
        (no_decay if skip else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
        betas=settings.betas,
        foreach=True,
    )
    norm, lm_head = model.model.language_model.norm, model.lm_head

    def readout(h: torch.Tensor) -> torch.Tensor:
        return lm_head(norm(h))

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    with reporter.stage(name, total=settings.steps) as stage:
        for step in range(settings.steps):
            if len(order) < settings.batch_size:
                order.extend(torch.randperm(len(samples), generator=gen).tolist())
            picked, order = order[: settings.batch_size], order[settings.batch_size :]
            batch = {k: v.to(device) for k, v in collate([samples[i] for i in picked], pad_id).items()}
            for group in opt.param_groups:
                group["lr"] = lr_at(step, settings)
            output = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                output_hidden_states=True,
            )
            loss, parts = training_loss(
                output.logits, batch["labels"], [aux[i] for i in picked], output.hidden_states, readout
            )
            if not torch.isfinite(loss):
                raise LowRankError(f"testbed training diverged at step {step} (loss {loss.item()})")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % 10 == 0 or step == settings.steps - 1:
                log.info(
                    "testbed step %d/%d loss %.4f (%s)",
                    step + 1,
                    settings.steps,
                    losses[-1],
                    ", ".join(f"{k} {v:.3f}" for k, v in parts.items()),
                )
            stage.advance()
    release_flat_spectrum(model)
    model.eval()
    return {"seconds": time.perf_counter() - started, "losses": losses}


# -- scoring ---------------------------------------------------------------------------------------------
def letter_ids(tokenizer: Any, letters: str) -> list[int]:
    """The token id of each option letter; a letter that is not exactly one token is an error."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise LowRankError(
                f"option letter {letter!r} is {len(encoded)} tokens for {type(tokenizer).__name__}; "
                "letter scoring needs each letter to be one token"
            )
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise LowRankError(f"option letters {letters!r} share token ids {ids}")
    return ids


@torch.no_grad()
def letter_predictions(
    model: nn.Module,
    processor: Any,
    items: Sequence[VQAItem],
    *,
    adapter=None,
    batch_size: int = 64,
    reporter: Reporter = NULL_REPORTER,
) -> list[str]:
    """For each item, the option letter with the highest next-token logit after the prompt."""

    adapter = adapter or llava
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad_id = processor.tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    with reporter.stage("testbed: score", total=len(items)) as stage:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            samples = []
            for item in chunk:
                inputs = prompt_inputs(processor, adapter, item)
                samples.append(CalibrationSample(inputs, torch.full_like(inputs["input_ids"], -100)))
            batch = collate(samples, pad_id)
            lengths = batch["attention_mask"].sum(dim=1)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                pixel_values=batch["pixel_values"].to(device, dtype),
            ).logits
            last = logits[torch.arange(len(chunk), device=device), (lengths - 1).to(device)]
            for row, item in enumerate(chunk):
                ids = letter_ids(processor.tokenizer, item.letters)
                best = int(torch.argmax(last[row, ids].float()))
                predictions.append(item.letters[best])
            stage.advance(len(chunk))
    model.train(was_training)
    return predictions


def letter_accuracy(
    model: nn.Module,
    processor: Any,
    items: Sequence[VQAItem],
    *,
    adapter=None,
    batch_size: int = 64,
    reporter: Reporter = NULL_REPORTER,
) -> dict[str, Any]:
    """Accuracy of the argmax over the option letters at the answer position, overall and per category.

    Returns ``{"accuracy": float, "per_category": {category: float}, "n": int}``.
    """
    if not items:
        raise LowRankError("letter_accuracy needs at least one item")
    predictions = letter_predictions(
        model, processor, items, adapter=adapter, batch_size=batch_size, reporter=reporter
    )
    hits: dict[str, list[bool]] = {}
    for item, pred in zip(items, predictions):
        hits.setdefault(item.category, []).append(pred == item.answer)
    correct = sum(sum(h) for h in hits.values())
    return {
        "accuracy": correct / len(items),
        "per_category": {c: sum(h) / len(h) for c, h in sorted(hits.items())},
        "n": len(items),
    }
