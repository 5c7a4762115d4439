"""Building the testbed once and finding it in the cache after.

A build lives at ``cache_subdir("testbed") / v<TESTBED_VERSION> / <size>``: a ``save_pretrained``
directory (config, safetensors, tokenizer, processor, chat template) plus ``testbed.json``, written
last, with what the build measured (test accuracy, per category, training time) and the sha256 of
the weights. A directory whose ``testbed.json`` is missing, unreadable, from another version or size,
or whose weights do not hash to the recorded sha256 is damaged: it is rebuilt, never used.

Builds are atomic (a temporary directory renamed into place) and serialised by a file lock, so two
processes asking for the same testbed at once build it once.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import transformers

from lowrank_kit.data.samples import make_sample
from lowrank_kit.data.synthetic import CATEGORIES, IMAGE_SIZE, generate_items, make_item
from lowrank_kit.errors import ModelLoadError, unknown_name
from lowrank_kit.models.families.llava import llava
from lowrank_kit.paths import build_lock, built_record, cache_subdir, sha256_file
from lowrank_kit.progress import NULL_REPORTER, Reporter
from lowrank_kit.testbed.model import PATCH_SIZE, SIZES, build_model
from lowrank_kit.testbed.processor import build_processor
from lowrank_kit.testbed.train import MAX_LENGTH, deterministic, letter_accuracy, supervision, train

log = logging.getLogger(__name__)

# Bump when the generator, tokenizer, architecture or training changes: old builds then stay where
# they are and a new one is built next to them.
TESTBED_VERSION = 3
INFO_FILE = "testbed.json"
WEIGHTS_FILE = "model.safetensors"
SEED = 0
# Files every build has; a directory missing one of them is damaged.
REQUIRED_FILES = (INFO_FILE, "config.json", WEIGHTS_FILE, "tokenizer.json", "processor_config.json")


def _sizes() -> dict:

    return SIZES


def check_size(size: str) -> str:
    sizes = _sizes()
    if size not in sizes:
        raise unknown_name("testbed size", size, sizes)
    return size


def testbed_root() -> Path:
    """Where the builds of this testbed version live."""
    return cache_subdir("testbed") / f"v{TESTBED_VERSION}"


def testbed_dir(size: str = "small") -> Path:
    """The directory of the ``size`` build (whether or not it has been built)."""
    return testbed_root() / check_size(size)


def is_testbed_dir(path: str | Path) -> bool:
    """Whether ``path`` is a testbed build (it holds the build's ``testbed.json`` record)."""
    return bool(str(path)) and (Path(path) / INFO_FILE).is_file()


def damage(path: Path, size: str) -> str | None:
    """Why the build at ``path`` cannot be used, or None when it is complete and intact."""
    info = built_record(path, REQUIRED_FILES, INFO_FILE)
    if isinstance(info, str):
        return info
    if info.get("version") != TESTBED_VERSION or info.get("size") != size:
        return f"{INFO_FILE} describes version {info.get('version')!r} size {info.get('size')!r}"
    if sha256_file(path / WEIGHTS_FILE) != info.get("weights_sha256"):
        return f"{WEIGHTS_FILE} does not match the sha256 recorded in {INFO_FILE}"
    return None


def testbed_info(size: str = "small") -> dict[str, Any]:
    """What the ``size`` build recorded (``testbed.json``) plus its ``path``; an error if not built."""
    path = testbed_dir(size)
    problem = damage(path, size)
    if problem == "not built":
        raise ModelLoadError(
            f"the {size} testbed is not built yet (no {str(path)!r}); run `lowrank testbed build --size {size}`"
        )
    if problem is not None:
        raise ModelLoadError(
            f"the {size} testbed at {str(path)!r} is damaged ({problem}); "
            f"run `lowrank testbed build --size {size} --force`"
        )
    info = json.loads((path / INFO_FILE).read_text())
    return {"path": str(path), **info}


def _default_device(size: str) -> str:

    return "cuda" if size == "base" and torch.cuda.is_available() else "cpu"


def ensure_testbed(
    size: str = "small",
    *,
    force: bool = False,
    reporter: Reporter = NULL_REPORTER,
    device: str | None = None,
) -> Path:
    """The directory of the ``size`` testbed, built first if it is not in the cache (or ``force``).

    ``device`` is where a build trains (default: the CPU; for ``base`` a GPU when there is one).
    A damaged cache entry is rebuilt, with a warning in the log.
    """
    check_size(size)
    path = testbed_dir(size)
    if not force and damage(path, size) is None:
        return path

    root = path.parent
    with build_lock(path, "testbed"):
        problem = damage(path, size)
        if problem is None and not force:
            return path  # another process built it while this one waited for the lock
        if problem not in (None, "not built"):
            log.warning("the %s testbed at %s is damaged (%s); rebuilding it", size, path, problem)
        for stale in [*root.glob(f".{size}.build-*"), *root.glob(f".{size}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a build that was killed
        tmp = Path(tempfile.mkdtemp(prefix=f".{size}.build-", dir=root))
        try:
            build_testbed(size, tmp, device=device or _default_device(size), reporter=reporter)
            old = None
            if path.exists():
                old = root / f".{size}.old-{uuid.uuid4().hex[:8]}"
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def training_items(settings: Any, seed: int) -> list:
    """The first ``settings.train_items`` train-split items, then each ``extra_items`` category's next ones."""

    items = generate_items("train", settings.train_items, seed=seed)
    for category, n in settings.extra_items:  # categories checked by TrainSettings
        k = CATEGORIES.index(category)
        first = settings.train_items + (k - settings.train_items) % len(CATEGORIES)
        items.extend(
            make_item("train", p, seed) for p in range(first, first + n * len(CATEGORIES), len(CATEGORIES))
        )
    return items


def build_testbed(
    size: str,
    directory: Path,
    *,
    device: str = "cpu",
    reporter: Reporter = NULL_REPORTER,
    spec: Any = None,
    seed: int = SEED,
) -> dict[str, Any]:
    """Generate the data, train the ``size`` model, score it on the test split and save everything.

    ``directory`` must exist and be empty. Returns what is written to ``testbed.json``. ``spec`` (a
    ``TestbedSize``, default: the registered one of ``size``) and ``seed`` (data splits and
    initialisation) let a settings sweep build variants (benchmarks/testbed_sweep.py); the cache only
    ever holds the registered sizes at :data:`SEED`.
    """

    spec = spec or _sizes()[check_size(size)]
    settings = spec.train
    started = time.perf_counter()
    directory = Path(directory)
    with deterministic(spec.threads):
        processor = build_processor(IMAGE_SIZE, PATCH_SIZE)
        tokenizer = processor.tokenizer
        items = training_items(settings, seed)
        samples, aux = [], []
        with reporter.stage(f"testbed {size}: training data", total=len(items)) as stage:
            for item in items:
                sample = make_sample(processor, llava, item, MAX_LENGTH)
                samples.append(sample)
                aux.append(supervision(sample, item, tokenizer))
                stage.advance()
        data_seconds = time.perf_counter() - started
        model = build_model(spec, tokenizer, seed=seed)
        result = train(
            model,
            samples,
            aux,
            settings,
            pad_id=tokenizer.pad_token_id,
            seed=seed,
            device=device,
            reporter=reporter,
            name=f"testbed {size}: train",
        )
        test = generate_items("test", seed=seed)
        score = letter_accuracy(model, processor, test, reporter=reporter)
        model.to("cpu")
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    info = {
        "version": TESTBED_VERSION,
        "size": size,
        "seed": seed,
        "test_accuracy": score["accuracy"],
        "test_accuracy_per_category": score["per_category"],
        "test_items": score["n"],
        "train_seconds": result["seconds"],
        "data_seconds": data_seconds,
        "build_seconds": time.perf_counter() - started,
        "parameters": params,
        "parameters_language_model": sum(p.numel() for p in model.model.language_model.parameters()),
        "weights_sha256": sha256_file(directory / WEIGHTS_FILE),
        "config": spec.summary(),
        "training": {
            "train_items": len(items),
            "extra_items": dict(settings.extra_items),
            "steps": settings.steps,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "warmup": settings.warmup,
            "weight_decay": settings.weight_decay,
            "final_loss": sum(result["losses"][-20:]) / len(result["losses"][-20:]),
        },
        "environment": {
            "device": str(device),
            "threads": spec.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "built the %s testbed in %.1f s: test accuracy %.3f, %d parameters",
        size,
        info["build_seconds"],
        info["test_accuracy"],
        params,
    )
    return info
