"""Multiple-choice evaluation: batched greedy decoding, VLMEvalKit-style scoring, NLL and KL of the letters.

For each item, :func:`evaluate` builds the prompt through :func:`~lowrank_kit.data.samples.prompt_inputs`
(the adapter's chat template, the same prompt calibration and the testbed's training use), batches
items with left padding (:func:`~lowrank_kit.eval.batching.collate`), decodes greedily and reads the
answer from the generated text the way VLMEvalKit's exact matching does
(:func:`~lowrank_kit.eval.matching.extract_answer`).

Two measures that move before accuracy does are reported next to it, both read from the logits at the
*answer position*, the position whose next token is the option letter in the assistant turn:

- ``nll``: mean over items of ``-log p(correct letter)``, with ``p`` the softmax over the whole
  vocabulary;
- ``kl``: with a reference model (the uncompressed one, same prompts), mean over items of
  ``KL(p_ref || p)`` between the two models' distributions over the item's option letters (the
  letter logits renormalised over those letters).

The answer position is found from the chat template itself: the assistant turn is rendered once per
option letter (:func:`~lowrank_kit.data.samples.make_sample`), and the tokens all letters share before
the letter (a space, for a template that writes ``ASSISTANT: B``) are appended to the prompt to reach
it. When there are none, the first step of ``generate`` already has these logits and no extra forward
pass is run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from lowrank_kit.calib_cache import key_digest, model_digest
from lowrank_kit.data.items import LETTERS, PROMPT_STYLES, VQAItem
from lowrank_kit.data.samples import IGNORE_INDEX, make_sample, prompt_inputs
from lowrank_kit.errors import LowRankError
from lowrank_kit.eval.batching import collate
from lowrank_kit.eval.cache import EvalCache, environment_key, inputs_digest, item_digest
from lowrank_kit.eval.matching import extract_answer
from lowrank_kit.placement import input_device
from lowrank_kit.progress import NULL_REPORTER, Reporter

log = logging.getLogger(__name__)

NO_CATEGORY = "(none)"
# make_sample's length check is for calibration; evaluation reads the template at any length.
_ANY_LENGTH = 1 << 30


class EvaluationError(LowRankError):
    """Evaluation cannot run on these inputs (data, settings or a model/processor that does not fit)."""


@dataclass
class ItemResult:
    """What the model did on one item."""

    index: int | str
    category: str
    answer: str
    prediction: str  # the generated text, special tokens removed, stripped
    predicted: str | None  # the option letter read from it (None: no option could be read)
    correct: bool
    nll: float  # -log p(correct letter) over the vocabulary, at the answer position
    letter_logprobs: list[float]  # log-softmax over the item's option letters, A first
    kl: float | None = None  # KL(reference || model) over the option letters
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    """Scores over a set of items, with the per-item results they come from."""

    items: list[ItemResult]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    cache_hits: int = 0

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.items) / len(self.items) if self.items else float("nan")

    @property
    def nll(self) -> float:
        return sum(r.nll for r in self.items) / len(self.items) if self.items else float("nan")

    @property
    def kl(self) -> float | None:
        values = [r.kl for r in self.items if r.kl is not None]
        if not values:
            return None
        return sum(values) / len(values)

    @property
    def unanswered(self) -> int:
        """Items where no option could be read from the generated text."""
        return sum(r.predicted is None for r in self.items)

    @property
    def per_category(self) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[ItemResult]] = {}
        for r in self.items:
            groups.setdefault(r.category or NO_CATEGORY, []).append(r)
        out = {}
        for name in sorted(groups):
            rows = groups[name]
            entry: dict[str, Any] = {
                "accuracy": sum(r.correct for r in rows) / len(rows),
                "n": len(rows),
                "nll": sum(r.nll for r in rows) / len(rows),
            }
            kls = [r.kl for r in rows if r.kl is not None]
            if kls:
                entry["kl"] = sum(kls) / len(kls)
            out[name] = entry
        return out

    def to_dict(self, *, items: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "accuracy": self.accuracy,
            "n": self.n,
            "correct": sum(r.correct for r in self.items),
            "unanswered": self.unanswered,
            "nll": self.nll,
            "kl": self.kl,
            "per_category": self.per_category,
            "seconds": round(self.seconds, 3),
            "cache_hits": self.cache_hits,
            "settings": self.settings,
        }
        if items:
            data["items"] = [r.to_dict() for r in self.items]
        return data


# -- the answer position -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnswerTokens:
    """How the chat template writes an answer: shared ``prefix`` tokens, then one token per letter."""

    prefix: tuple[int, ...]
    letter_ids: tuple[int, ...]  # first token of "A", "B", ... after the prefix


def answer_tokens(
    processor: Any, adapter, item: VQAItem, n_letters: int, *, prompt_style: str = "letter"
) -> AnswerTokens:
    """Render ``item``'s assistant turn with each of the first ``n_letters`` letters and compare tokens."""

    if n_letters > len(item.options):
        item = dataclasses.replace(item, options=[*item.options, *LETTERS[len(item.options) : n_letters]])
    spans = []
    for letter in LETTERS[:n_letters]:
        sample = make_sample(
            processor,
            adapter,
            dataclasses.replace(item, answer=letter),
            _ANY_LENGTH,
            prompt_style=prompt_style,
        )
        ids = sample.inputs["input_ids"][0]
        spans.append(ids[sample.labels[0] != IGNORE_INDEX].tolist())
    shared = 0
    while all(len(s) > shared for s in spans) and len({s[shared] for s in spans}) == 1:
        shared += 1
    if any(len(s) <= shared for s in spans):
        raise EvaluationError(
            "the chat template renders the option letters as tokens that do not differ, so the letter "
            f"distribution cannot be read (assistant turns {spans[:4]})"
        )
    letter_ids = tuple(s[shared] for s in spans)
    if len(set(letter_ids)) != len(letter_ids):
        raise EvaluationError(f"two option letters start with the same token (token ids {list(letter_ids)})")
    return AnswerTokens(prefix=tuple(spans[0][:shared]), letter_ids=letter_ids)


# -- one batch -----------------------------------------------------------------------------------------
def _tokenizer(processor: Any):
    return getattr(processor, "tokenizer", None) or processor


def _special_ids(model: nn.Module, tokenizer: Any) -> tuple[int, list[int]]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise EvaluationError(
            "neither the model's generation config nor the tokenizer names an end-of-sequence token"
        )
    eos_ids = [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0]
    return int(pad), eos_ids


def _to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    return {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        for k, v in batch.items()
    }


def _with_prefix(batch: dict[str, torch.Tensor], prefix: Sequence[int]) -> dict[str, torch.Tensor]:
    """The batch with the answer prefix tokens appended to every row (they are text, not image tokens)."""
    rows = batch["input_ids"].shape[0]
    extra = torch.tensor(
        [list(prefix)] * rows, dtype=batch["input_ids"].dtype, device=batch["input_ids"].device
    )
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], extra], dim=1)
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in batch:
            fill = torch.ones_like(extra) if key == "attention_mask" else torch.zeros_like(extra)
            out[key] = torch.cat([batch[key], fill.to(batch[key].dtype)], dim=1)
    return out


@torch.inference_mode()
def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor], prefix: Sequence[int]) -> torch.Tensor:
    """``[rows, vocab]`` logits at the answer position by one forward pass over prompt + ``prefix``."""
    out = model(**_with_prefix(batch, prefix), use_cache=False, logits_to_keep=1)
    return out.logits[:, -1, :].float()


def greedy_config(generation: dict[str, Any], *, output_logits: bool = False):
    """The generation config of every evaluation: greedy, nothing from the checkpoint's own defaults."""

    return GenerationConfig(
        max_new_tokens=generation["max_new_tokens"],
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        pad_token_id=generation["pad_token_id"],
        eos_token_id=generation["eos_token_id"],
        output_logits=output_logits,
        return_dict_in_generate=True,
    )


def generation_settings(model: nn.Module, processor: Any, max_new_tokens: int) -> dict[str, Any]:
    pad, eos = _special_ids(model, _tokenizer(processor))
    return {"max_new_tokens": max_new_tokens, "pad_token_id": pad, "eos_token_id": eos, "greedy": True}


@torch.inference_mode()
def generate_texts(
    model: nn.Module,
    inputs: list[dict[str, torch.Tensor]],
    tokenizer: Any,
    generation: dict[str, Any],
    *,
    output_logits: bool = False,
) -> tuple[list[str], dict[str, torch.Tensor], Any]:
    """Greedy answers for single-row inputs batched together: (texts, the batch, generate's output)."""
    param = next(model.parameters())
    batch = _to_device(collate(inputs, generation["pad_token_id"]), param.device, param.dtype)
    out = model.generate(**batch, generation_config=greedy_config(generation, output_logits=output_logits))
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts, batch, out


def _run_batch(
    model: nn.Module,
    inputs: list[dict[str, torch.Tensor]],
    tokens: AnswerTokens,
    tokenizer: Any,
    generation: dict[str, Any],
) -> tuple[list[str], torch.Tensor]:
    """Generated texts and answer-position logits ``[rows, vocab]`` for one batch of single-row inputs."""
    texts, batch, out = generate_texts(model, inputs, tokenizer, generation, output_logits=not tokens.prefix)
    logits = answer_logits(model, batch, tokens.prefix) if tokens.prefix else out.logits[0].float()
    return texts, logits


# -- evaluation ----------------------------------------------------------------------------------------
def _check_settings(
    items: Sequence[VQAItem], batch_size: int, max_new_tokens: int, prompt_style: str
) -> None:
    if not items:
        raise EvaluationError("no items to evaluate")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EvaluationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if prompt_style not in PROMPT_STYLES:
        raise EvaluationError(f"unknown prompt style {prompt_style!r}; available: {', '.join(PROMPT_STYLES)}")


def _score(
    item: VQAItem, prediction: str, letter_logprobs: list[float], nll: float, cached: bool
) -> ItemResult:
    predicted = extract_answer(prediction, item.options)
    return ItemResult(
        index=item.index,
        category=item.category,
        answer=item.answer,
        prediction=prediction,
        predicted=predicted,
        correct=predicted == item.answer,
        nll=nll,
        letter_logprobs=letter_logprobs,
        cached=cached,
    )


def evaluate(
    model: nn.Module,
    processor: Any,
    adapter,
    items: Sequence[VQAItem],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    prompt_style: str = "letter",
    reference: nn.Module | EvalResult | None = None,
    reporter: Reporter = NULL_REPORTER,
    cache: EvalCache | None = None,
    description: str = "evaluate",
) -> EvalResult:
    """Score ``model`` on multiple-choice ``items`` (see the module docstring).

    ``reference``: an uncompressed model to compare the letter distributions with (evaluated here on
    the same prompts, through the same cache), or its :class:`EvalResult` on the same items.
    ``cache``: reuse and store per-item results (:class:`~lowrank_kit.eval.cache.EvalCache`).
    """

    items = list(items)
    _check_settings(items, batch_size, max_new_tokens, prompt_style)
    if processor is None:
        raise EvaluationError(
            "this model has no processor (tokenizer + image processor + chat template) to build prompts "
            "with; evaluate a checkpoint directory that ships its processor"
        )
    t0 = time.perf_counter()
    tokenizer = _tokenizer(processor)
    generation = generation_settings(model, processor, max_new_tokens)
    widest = max(items, key=lambda it: len(it.options))
    tokens = answer_tokens(processor, adapter, widest, len(widest.options), prompt_style=prompt_style)
    device = input_device(model)

    base_key: dict[str, Any] | None = None
    if cache is not None:
        base_key = {
            **environment_key(device),
            "model": model_digest(model),
            "prompt_style": prompt_style,
            "generation": generation,
            "answer_tokens": dataclasses.asdict(tokens),
        }

    results: list[ItemResult | None] = [None] * len(items)
    hits = 0
    with reporter.stage(description, total=len(items)) as stage:
        for start in range(0, len(items), batch_size):
            chunk = list(range(start, min(start + batch_size, len(items))))
            built = {i: prompt_inputs(processor, adapter, items[i], prompt_style=prompt_style) for i in chunk}
            keys: dict[int, str] = {}
            todo = []
            for i in chunk:
                if base_key is not None:
                    parts = {**base_key, "item": item_digest(items[i]), "inputs": inputs_digest(built[i])}
                    keys[i] = key_digest(parts)
                    value = cache.get(keys[i])
                    if value is not None:
                        results[i] = _score(
                            items[i], value["prediction"], value["letter_logprobs"], value["nll"], True
                        )
                        hits += 1
                        continue
                todo.append(i)
            if todo:
                texts, logits = _run_batch(model, [built[i] for i in todo], tokens, tokenizer, generation)
                logp = torch.log_softmax(logits, dim=-1)
                for row, i in enumerate(todo):
                    item = items[i]
                    ids = torch.tensor(tokens.letter_ids[: len(item.options)], device=logits.device)
                    letters = torch.log_softmax(logits[row, ids], dim=-1).tolist()
                    nll = float(-logp[row, tokens.letter_ids[LETTERS.index(item.answer)]])
                    results[i] = _score(item, texts[row], letters, nll, False)
                    if base_key is not None:
                        cache.put(
                            keys[i],
                            {"prediction": texts[row], "letter_logprobs": letters, "nll": nll},
                            parts={"index": str(item.index)},
                        )
            stage.advance(len(chunk))

    result = EvalResult(
        items=[r for r in results if r is not None],
        settings={
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "prompt_style": prompt_style,
            "answer_prefix_tokens": list(tokens.prefix),
            "letter_token_ids": list(tokens.letter_ids),
        },
        cache_hits=hits,
    )
    if reference is not None:
        if isinstance(reference, nn.Module):
            reference = evaluate(
                reference,
                processor,
                adapter,
                items,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                prompt_style=prompt_style,
                reporter=reporter,
                cache=cache,
                description=f"{description} (reference)",
            )
        attach_kl(result, reference)
    result.seconds = time.perf_counter() - t0
    return result


def letter_kl(reference: Sequence[float], model: Sequence[float]) -> float:
    """KL(reference || model) of two log-probability vectors over the same option letters."""
    return float(sum(math.exp(r) * (r - m) for r, m in zip(reference, model)))


def attach_kl(result: EvalResult, reference: EvalResult) -> None:
    """Fill ``kl`` of each item of ``result`` from the same item of ``reference``."""
    if [r.index for r in result.items] != [r.index for r in reference.items]:
        raise EvaluationError(
            f"the reference was evaluated on other items ({reference.n} items, this run {result.n}); "
            "evaluate both on the same data and --limit"
        )
    for mine, ref in zip(result.items, reference.items):
        if len(mine.letter_logprobs) != len(ref.letter_logprobs):
            raise EvaluationError(f"item {mine.index!r}: the reference has another number of options")
        mine.kl = letter_kl(ref.letter_logprobs, mine.letter_logprobs)
    result.settings["reference_accuracy"] = reference.accuracy
    result.settings["reference_nll"] = reference.nll
