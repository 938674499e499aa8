"""Hugging Face ``datasets``: a ``save_to_disk`` folder, a local folder read by its ``imagefolder``, or a hub name.

The image column is decoded once into the same on-disk uint8 cache as image folders (``data.cache``), keyed
by the data set's fingerprint, the split, the sizes and modification times of the local files, and the
options; labels come from a ``ClassLabel`` column (or one named ``label`` / ``labels``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .cache import file_record, hasher
from .dataset import CachedImageDataset
from .images import cached_images


def is_saved_hf(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _open(name: str, split: str):
    try:
        import datasets
    except ImportError as e:
        raise ValueError("Hugging Face data sets need the `datasets` package: pip install datasets") from e
    path = Path(name).expanduser()
    try:
        if path.is_dir() and is_saved_hf(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{path} has splits {list(ds)}, not {split!r}")
                ds = ds[split]
        elif path.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        else:
            ds = datasets.load_dataset(name, split=split)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # network, missing split, bad files: one clear message before training
        raise ValueError(f"could not load the Hugging Face data set {name!r} (split {split!r}): {e}") from e
    return datasets, ds


def load_hf(name: str, image_size=None, channels=None, split: str = "train", flip: bool = False, *,
            conditioning: str | None = None, progress: bool = True,
            text_column: str | None = None) -> CachedImageDataset:
    """A ``datasets`` data set as (x, cond) items: x from the first ``Image`` column (or image / img / images),
    cond ``{"class_labels"}`` from the label column when there is one; ``.captions`` from ``text_column``
    (none: text, caption, captions or prompt)."""
    datasets, ds = _open(name, split)
    feats = ds.features
    image_col = next((c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
    image_col = image_col or next((c for c in ("image", "img", "images") if c in feats), None)
    if image_col is None:
        raise ValueError(f"no image column in {name!r}: columns are {list(feats)}")
    label_col = next((c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    label_col = label_col or next((c for c in ("label", "labels") if c in feats), None)
    from .captions import caption_column

    caption_col = caption_column(feats, text_column, name)

    images = ds.select_columns([image_col])
    if isinstance(feats[image_col], datasets.Image):
        images = images.cast_column(image_col, datasets.Image(decode=False))  # {"bytes", "path"}: decoded by us
    source = hasher("hf", name, split, image_size, channels).hexdigest()
    content = hashlib.sha256(str(getattr(ds, "_fingerprint", "")).encode())
    path = Path(name).expanduser()
    if path.is_dir():  # local files: their sizes and modification times too
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                p = Path(folder) / f
                file_record(content, str(p.relative_to(path)), p.stat())
    pixels, kept, notes, entry = cached_images(
        source, content.hexdigest(), len(ds), lambda i: images[i][image_col], lambda i: f"{name}[{i}]",
        image_size=image_size, channels=channels, where=name, progress=progress, workers=1)
    kept = list(kept)
    labels = torch.tensor(list(ds[label_col]), dtype=torch.int64)[kept] if label_col else None
    classes = feats[label_col].names if label_col and isinstance(feats[label_col], datasets.ClassLabel) else None
    captions = None
    if caption_col:
        column = list(ds[caption_col])
        captions = [column[i] for i in kept]
    return CachedImageDataset(pixels, labels, flip=flip, classes=classes, captions=captions, name=name,
                              conditioning=conditioning, notes=notes, cache_path=entry)
