"""Data: one protocol over bundled sets, image folders, Hugging Face datasets and toy 2-D distributions.

    from diffusion_forge.data import load_dataset
    ds = load_dataset("mnist")                 # 60,000 x (1, 28, 28) in [-1, 1], labels 0-9
    ds = load_dataset("photos/", image_size=64, channels=3, flip=True)   # a folder of images, recursive
    ds = load_dataset("hf:my_saved_dataset/")  # datasets' save_to_disk folder, or its imagefolder
    ds = load_dataset("moons")                 # 2-D points, (2,) float vectors
    x, cond = ds[0]                   # x float32 (C, H, W) in [-1, 1] (a vector for toy sets);
                                      # cond {} or {"class_labels": int64 scalar tensor}
    xb, cond = ds.get_batch(idx)      # a whole batch at once, cond {"class_labels": (B,)} or {}
    ds.shape, ds.kind, ds.num_classes, ds.has_labels, ds.has_captions

Bundled sets are held in memory (uint8). Image folders and Hugging Face image sets are decoded once into
an on-disk uint8 cache under ``io.files.cache_dir()`` (``data.cache``) and memory-mapped, so memory does
not grow with the number of images and later loads start at once. Unreadable files are skipped with one
warning that names them; an empty data set or a wrong path raises before any training starts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .bundled import BUNDLED, WHITE, load_bundled_images, load_mnist, split_seed
from .convert import model_to_uint8, rescale_to_uint8, to_model_range, to_uint8, uint8_to_model
from .dataset import ArrayDataset, CachedImageDataset, InMemoryDataset
from .images import IMAGE_EXTENSIONS, load_image_folder
from .toy import TOY_CLASSES, TOY_SETS, toy_2d

__all__ = ["BUNDLED", "TOY_SETS", "IMAGE_EXTENSIONS", "WHITE", "list_datasets", "load_dataset", "load_mnist",
           "load_image_folder", "toy_2d", "to_model_range", "to_uint8", "uint8_to_model", "model_to_uint8",
           "rescale_to_uint8", "ArrayDataset", "InMemoryDataset", "CachedImageDataset"]


def list_datasets() -> dict[str, str]:
    """Bundled data set names -> one-line descriptions with their sizes."""
    return {name: f"{desc} ({size})" for name, (desc, size) in BUNDLED.items()}


def load_dataset(spec: str, image_size: int | None = None, channels: int | None = None, split: str = "train",
                 flip: bool = False, conditioning: str | None = None, *, progress: bool = True,
                 text_column: str | None = None) -> ArrayDataset:
    """A data set from a bundled name, a folder of images, a Hugging Face ``save_to_disk`` folder, or
    ``hf:NAME_OR_FOLDER`` (``datasets.load_dataset``; a plain folder goes through its ``imagefolder``).

    ``image_size``: resize the shorter side and centre-crop (None: the bundled size, or the first image's
    shorter side for folders). ``channels``: 1 or 3 (None: 1 if every image is grey, else 3).
    ``conditioning``: None (class labels in cond when the data has them), "none", "class" (labels required)
    or "text" (captions required; cond ``{"caption_ids"}``, see ``data.captions``). ``text_column``: the caption
    column of a Hugging Face set, or the key of an image folder's metadata.jsonl (none: text, else caption).
    ``progress``: a progress bar on stderr while a cache is built.
    Image folders have one split: ``split`` applies to bundled and Hugging Face sets.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    name = str(spec).strip()
    if name.lower() in BUNDLED:
        name = name.lower()
        if name in TOY_SETS:
            if image_size is not None or channels is not None:
                raise ValueError(f"{name!r} is a set of 2-D points: image_size and channels do not apply")
            x, labels = toy_2d(name, 10_000 if split == "train" else 2_000, seed=split_seed(split, name))
            return ArrayDataset(torch.from_numpy(x), torch.from_numpy(labels), flip=flip, name=name,
                                classes=TOY_CLASSES.get(name), conditioning=conditioning)
        images, labels, extra = load_bundled_images(name, split, image_size, channels)
        return ArrayDataset(images, labels, flip=flip, name=name, conditioning=conditioning, **extra)

    from .hf import is_saved_hf, load_hf

    if name.startswith("hf:"):
        return load_hf(name[3:], image_size, channels, split, flip, conditioning=conditioning, progress=progress,
                       text_column=text_column)
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no data set named {spec!r}: not a bundled name ({', '.join(BUNDLED)}) "
                                f"and no such folder {path.resolve()}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; give a folder of images or a bundled name")
    if is_saved_hf(path):
        return load_hf(str(path), image_size, channels, split, flip, conditioning=conditioning, progress=progress,
                       text_column=text_column)
    return load_image_folder(path, image_size, channels, flip, conditioning=conditioning, progress=progress,
                             text_column=text_column)
