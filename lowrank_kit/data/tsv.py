"""VLMEvalKit's multiple-choice TSV format, read and written.

One row per question with the columns ``index``, ``image`` (base64-encoded image), ``question``,
``hint``, the option columns ``A``, ``B``, ... (empty past the last option), ``answer`` (a letter),
``category`` and, optionally, ``split`` and ``l2-category``. As in VLMEvalKit's own files, a row may
name another row's ``index`` in its ``image`` field instead of repeating the same picture.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lowrank_kit.data.items import LETTERS, VQAItem
from lowrank_kit.errors import CalibrationError

REQUIRED = ("index", "image", "question", "answer")
# VLMEvalKit treats an image field this short as a reference to another row's index.
_REFERENCE_MAX = 64


def encode_image(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(data: str, where: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    except (ValueError, UnidentifiedImageError, OSError) as err:
        raise CalibrationError(f"{where}: the image field is not a base64-encoded image ({err})") from None


def _blank(value: str | None) -> bool:
    return value is None or value.strip() in ("", "nan", "NaN", "None")


def load_tsv(path: str | Path) -> list[VQAItem]:
    """Every row of a VLMEvalKit multiple-choice TSV as a :class:`VQAItem`, in file order."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"TSV file {str(path)!r} does not exist")
    csv.field_size_limit(sys.maxsize)  # base64 images are far over csv's default field limit
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise CalibrationError(
                f"TSV file {str(path)!r} lacks the columns {', '.join(missing)}; a VLMEvalKit multiple-choice "
                f"TSV has {', '.join(REQUIRED)}, hint, A, B, ..., category"
            )
        option_cols = [c for c in LETTERS if c in columns]
        rows = list(reader)
    images = {
        r["index"]: r["image"] for r in rows if not _blank(r["image"]) and len(r["image"]) > _REFERENCE_MAX
    }
    items = []
    for line, row in enumerate(rows, start=2):
        where = f"{path.name} line {line} (index {row['index']})"
        data = row["image"]
        if not _blank(data) and len(data) <= _REFERENCE_MAX:
            if data not in images:
                raise CalibrationError(f"{where}: the image refers to index {data!r}, which has no image")
            data = images[data]
        if _blank(data):
            raise CalibrationError(f"{where}: the row has no image")
        options = []
        for c in option_cols:
            if _blank(row.get(c)):
                break
            options.append(row[c])
        try:
            items.append(
                VQAItem(
                    image=decode_image(data, where),
                    question=row["question"],
                    options=options,
                    answer=(row["answer"] or "").strip(),
                    hint=None if _blank(row.get("hint")) else row["hint"],
                    category="" if _blank(row.get("category")) else row["category"],
                    index=row["index"],
                    split="" if _blank(row.get("split")) else row["split"],
                )
            )
        except ValueError as err:
            raise CalibrationError(f"{where}: {err}") from None
    return items


def write_tsv(items: Iterable[VQAItem], path: str | Path) -> Path:
    """Write ``items`` as a VLMEvalKit TSV (atomically: a temporary file renamed into place)."""
    items = list(items)
    path = Path(path)
    width = max((len(it.options) for it in items), default=4)
    columns = ["index", "image", "question", "hint", *LETTERS[:width], "answer", "category", "split"]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(columns)
            for it in items:
                opts = list(it.options) + [""] * (width - len(it.options))
                writer.writerow(
                    [
                        it.index,
                        encode_image(it.image),
                        it.question,
                        it.hint or "",
                        *opts,
                        it.answer,
                        it.category,
                        it.split,
                    ]
                )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
