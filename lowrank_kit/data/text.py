"""Text corpora for calibrating and evaluating language models, with disjoint calibration and evaluation parts.

A corpus is named by a spec string:

- ``text:pydoc``: the Python reference manual that ships with every Python (``pydoc_data.topics``),
  real human-written English with code, one document per topic. Its text follows the Python version.
- ``text:PATH``: a UTF-8 text file, or a directory whose ``*.txt`` files (searched recursively) are
  the documents.
- ``hf:DATASET[:CONFIG]``: a ``datasets`` dataset, e.g. ``hf:Salesforce/wikitext:wikitext-2-raw-v1``.
- ``hf:PATH``: a directory written by ``save_to_disk`` (or a local copy of a hub dataset repository).

Calibration must never see evaluation text, so every corpus has two disjoint parts:

- documents (pydoc topics, files of a directory) go to the evaluation part when the SHA-256 of their
  name (topic name, path relative to the directory) is 0 modulo 5, i.e. about one in five; the rest is
  calibration. A hash of the name keeps a document on the same side when others are added or removed
  (pydoc's topics change between Python versions). Documents of a manual repeat each other (pydoc's
  ``compound`` topic contains ``if``, ``while``, ``try``...), so every calibration paragraph (a block
  between blank lines) that also occurs in the evaluation part is dropped from calibration.
- a single text file is cut by position: the first 80% of its characters (up to the next line end) is
  calibration, the rest evaluation.
- a ``datasets`` dataset uses its own splits: calibration reads ``train``, evaluation ``test`` unless a
  split is named. A ``save_to_disk`` directory holding one split-less ``Dataset`` is cut by row position,
  the first 80% of rows for calibration.

A part's documents (dataset rows) are joined with ``"\\n\\n"``. For wikitext this is the usual protocol
of SVD-LLM, ASVD and Palu: join the raw rows, tokenize once, cut the token stream into windows
(:func:`token_windows`).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics as PYDOC_TOPICS
from typing import Any, Literal

import torch

from lowrank_kit.data.calibration import CalibrationSample
from lowrank_kit.errors import CalibrationError, LowRankError

log = logging.getLogger(__name__)

Part = Literal["calibration", "evaluation"]
PARTS = ("calibration", "evaluation")

# Documents whose name hashes to 0 modulo EVAL_BUCKETS are evaluation text (about 1 in 5).
EVAL_BUCKETS = 5
# A text file or a split-less dataset: this fraction of characters / rows, from the start, is calibration.
CALIBRATION_FRACTION = 0.8
# Dataset splits each part reads when none is named.
DEFAULT_SPLITS = {"calibration": "train", "evaluation": "test"}

VALID_FORMS = (
    "text:pydoc, text:PATH (a UTF-8 text file or a directory of .txt files), "
    "hf:DATASET[:CONFIG] (e.g. hf:Salesforce/wikitext:wikitext-2-raw-v1) or hf:PATH (a save_to_disk directory)"
)


class CorpusError(LowRankError):
    """A text corpus spec is invalid, or its data cannot be found, read or split."""


@dataclass(frozen=True)
class CorpusSpec:
    """A parsed corpus spec; ``kind`` says where the text comes from."""

    raw: str
    kind: Literal["pydoc", "file", "directory", "hub", "disk"]
    location: str = ""  # file or directory path, or dataset name / local dataset repository
    config: str | None = None  # the dataset's configuration (hub only)


def parse_corpus(spec: str | CorpusSpec) -> CorpusSpec:
    """Parse ``spec``; paths must exist (a ``hf:`` name that is no local directory is a hub dataset)."""
    if isinstance(spec, CorpusSpec):
        return spec
    prefix, sep, rest = str(spec).partition(":")
    if not sep or not rest or prefix not in ("text", "hf"):
        raise CorpusError(f"invalid text corpus {spec!r}; expected {VALID_FORMS}")
    if prefix == "text":
        if rest == "pydoc":
            return CorpusSpec(spec, "pydoc")
        path = Path(rest).expanduser()
        if path.is_file():
            return CorpusSpec(spec, "file", str(path))
        if path.is_dir():
            return CorpusSpec(spec, "directory", str(path))
        raise CorpusError(f"text corpus {spec!r}: file {str(path)!r} does not exist")
    path = Path(rest).expanduser()
    if path.is_dir():
        return _local_dataset(spec, path, None)
    name, sep, config = rest.partition(":")
    if not name or (sep and not config) or ":" in config:
        raise CorpusError(f"invalid text corpus {spec!r}; expected {VALID_FORMS}")
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_dataset(spec, path, config or None)
    if name.startswith(("/", ".", "~")):
        raise CorpusError(f"text corpus {spec!r}: dataset directory {str(path)!r} does not exist")
    return CorpusSpec(spec, "hub", name, config or None)


def _local_dataset(spec: str, path: Path, config: str | None) -> CorpusSpec:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        if config is not None:
            raise CorpusError(
                f"invalid text corpus {spec!r}: a save_to_disk directory has no configurations; use hf:PATH"
            )
        return CorpusSpec(spec, "disk", str(path))
    return CorpusSpec(spec, "hub", str(path), config)  # a local dataset repository: load_dataset reads it


def corpus_text(spec: str | CorpusSpec, part: Part, *, split: str | None = None, column: str = "text") -> str:
    """The ``part`` of the corpus, its documents joined with a blank line.

    ``split`` names the dataset split to read (``hf:`` corpora only; default: ``train`` for calibration,
    ``test`` for evaluation); ``column`` is the dataset's text column.
    """
    if part not in PARTS:
        raise CorpusError(f"unknown corpus part {part!r}; available: {', '.join(PARTS)}")
    corpus = parse_corpus(spec)
    if split is not None and corpus.kind not in ("hub", "disk"):
        raise CorpusError(
            f"text corpus {corpus.raw!r} has no dataset splits (got split {split!r}); "
            "only hf: corpora take a split"
        )
    if corpus.kind == "pydoc":
        text = _document_part([(name, PYDOC_TOPICS[name]) for name in sorted(PYDOC_TOPICS)], part)
    elif corpus.kind == "directory":
        text = _document_part(_directory_documents(corpus), part)
    elif corpus.kind == "file":
        text = _position_part(_read(Path(corpus.location)), part)
    else:
        text = _dataset_part(corpus, part, split, column)
    if not text.strip():
        raise CorpusError(f"the {part} part of text corpus {corpus.raw!r} is empty")
    return text


def is_evaluation_document(name: str) -> bool:
    """Whether the document called ``name`` belongs to the evaluation part (the hash rule above)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0


def _document_part(documents: list[tuple[str, str]], part: Part) -> str:
    evaluation = [text for name, text in documents if is_evaluation_document(name)]
    if part == "evaluation":
        return "\n\n".join(evaluation)
    seen = {p.strip() for text in evaluation for p in text.split("\n\n") if p.strip()}
    calibration = []
    for name, text in documents:
        if is_evaluation_document(name):
            continue
        kept = [p for p in text.split("\n\n") if p.strip() not in seen]
        if any(p.strip() for p in kept):
            calibration.append("\n\n".join(kept))
    return "\n\n".join(calibration)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"text file {str(path)!r} is not UTF-8 ({err.reason} at byte {err.start})"
        ) from None


def _directory_documents(corpus: CorpusSpec) -> list[tuple[str, str]]:
    root = Path(corpus.location)
    files = sorted(root.rglob("*.txt"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise CorpusError(f"text corpus {corpus.raw!r}: directory {str(root)!r} has no .txt files")
    return [(f.relative_to(root).as_posix(), _read(f)) for f in files]


def _position_part(text: str, part: Part) -> str:
    cut = int(len(text) * CALIBRATION_FRACTION)
    line_end = text.find("\n", cut)
    if line_end >= 0:
        cut = line_end + 1
    return text[:cut] if part == "calibration" else text[cut:]


def _rows_part(rows: Any, part: Part) -> Any:
    cut = int(len(rows) * CALIBRATION_FRACTION)
    return rows.select(range(cut) if part == "calibration" else range(cut, len(rows)))


def _dataset_part(corpus: CorpusSpec, part: Part, split: str | None, column: str) -> str:
    import datasets  # heavy (pyarrow) and needed only for hf: corpora; the GPU image runs without it

    chosen = split or DEFAULT_SPLITS[part]
    if corpus.kind == "disk":
        rows = _load_from_disk(corpus)
        if isinstance(rows, datasets.DatasetDict):
            if chosen not in rows:
                raise CorpusError(
                    f"dataset {corpus.location!r} has no split {chosen!r} for {part}; "
                    f"splits: {', '.join(rows)}"
                )
            rows = rows[chosen]
        elif split is not None:
            raise CorpusError(
                f"dataset {corpus.location!r} is one Dataset without splits (got split {split!r}); "
                f"it is cut by row position instead, the first {CALIBRATION_FRACTION:.0%} for calibration"
            )
        else:
            rows = _rows_part(rows, part)
    else:
        rows = _load_hub(corpus, chosen)
    if column not in rows.column_names:
        raise CorpusError(
            f"dataset {corpus.location!r} has no text column {column!r}; columns: {', '.join(rows.column_names)}"
        )
    return "\n\n".join(str(t) for t in rows[column] if t is not None)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _load_from_disk(corpus: CorpusSpec) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(corpus.location)
    except Exception as err:  # datasets raises anything from FileNotFoundError to IndexError here
        raise CorpusError(
            f"cannot read dataset directory {corpus.location!r} ({_first_line(err)}); "
            "write it again with Dataset.save_to_disk or DatasetDict.save_to_disk"
        ) from None


def _load_hub(corpus: CorpusSpec, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(corpus.location, corpus.config, split=split)
    except Exception as err:  # offline, unknown name, config or split: datasets' types vary by version
        config = f" config {corpus.config!r}" if corpus.config else ""
        raise CorpusError(
            f"cannot load dataset {corpus.location!r}{config} split {split!r} ({_first_line(err)}); "
            "it needs the hub or a local copy: download it once into the hub cache and run with "
            "HF_DATASETS_OFFLINE=1, or pass a save_to_disk directory as hf:PATH, or a text file as text:PATH"
        ) from None


def _text_tokenizer(tokenizer: Any) -> Any:
    """A processor's tokenizer, or the tokenizer itself."""
    return getattr(tokenizer, "tokenizer", None) or tokenizer


def token_windows(
    tokenizer: Any, text: str, window: int, max_windows: int | None = None, stride: int | None = None
) -> torch.Tensor:
    """``[n, window]`` token ids: ``text`` tokenized once, cut into windows, the ragged tail dropped.

    Windows start every ``stride`` tokens (default ``window``: non-overlapping, the usual perplexity
    protocol); ``max_windows`` keeps the first ones. The tokenizer adds its special tokens as it does by
    default (a Llama tokenizer's ``<s>`` starts the first window only), as SVD-LLM and ASVD do.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    stride = window if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be at least 1 token, got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1 or None, got {max_windows}")
    # verbose=False: the whole corpus is longer than model_max_length on purpose; windows are not.
    ids = _text_tokenizer(tokenizer)(text, verbose=False)["input_ids"]
    starts = range(0, len(ids) - window + 1, stride)
    if max_windows is not None:
        starts = starts[:max_windows]
    if len(starts) == 0:
        raise CorpusError(
            f"the text is {len(ids)} tokens long, shorter than one window of {window}; "
            "use a shorter window or a longer corpus"
        )
    stream = torch.tensor(ids, dtype=torch.long)
    return torch.stack([stream[s : s + window] for s in starts])


def text_calibration_samples(
    tokenizer: Any,
    spec: str | CorpusSpec,
    num_samples: int,
    max_length: int,
    seed: int,
    *,
    split: str | None = None,
    column: str = "text",
) -> list[CalibrationSample]:
    """``num_samples`` windows of ``max_length`` tokens from the corpus's calibration part.

    The calibration text is cut into non-overlapping windows and ``seed`` picks which (in a seeded
    order; all of them, with a warning, when there are fewer). Labels are the input ids: the loss is the
    teacher-forced loss over every text token.
    """
    if num_samples < 1:
        raise CalibrationError(f"num_samples must be at least 1, got {num_samples}")
    text = corpus_text(spec, "calibration", split=split, column=column)
    try:
        windows = token_windows(tokenizer, text, max_length)
    except CorpusError as err:
        raise CalibrationError(f"calibration part of text corpus {parse_corpus(spec).raw!r}: {err}") from None
    order = list(range(windows.shape[0]))
    random.Random(seed).shuffle(order)
    if len(order) < num_samples:
        log.warning(
            "text corpus %r has %d calibration windows of %d tokens, fewer than the %d asked for; using all",
            parse_corpus(spec).raw,
            len(order),
            max_length,
            num_samples,
        )
    samples = []
    for i in order[:num_samples]:
        ids = windows[i : i + 1].clone()
        samples.append(
            CalibrationSample(
                inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels=ids.clone()
            )
        )
    return samples
