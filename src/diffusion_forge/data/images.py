"""Folders of image files, streamed through the on-disk uint8 cache (``data.cache``).

Each image is opened with PIL, EXIF-rotated, flattened onto white (transparency), its centre square cut and
resized (bicubic) to ``image_size`` (default: the first image's shorter side), and stored as uint8.
High-bit-depth greyscale (PIL modes I;16, I;16B, I;16L, and I holding 16-bit values) is scaled, not
clipped: u = round(v * 255 / 65535). Unreadable files are skipped with one warning that names them.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .cache import Decoded, UnsupportedImage, file_record, get_or_build, hasher, kept_indices, skipped_message
from .convert import rescale_to_uint8
from .dataset import CachedImageDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
WHITE = (255, 255, 255)
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit greyscale (I: 32-bit container)
LARGE = 256  # with no image_size, a side above this gets a warning that suggests one
SUGGESTED_SIZE = 64


def list_images(root: Path) -> tuple[list[str], list[str]]:
    """Image files under ``root`` (recursive; relative POSIX paths, sorted as ``sorted(Path)`` sorts them) and
    the hidden entries skipped (a name starting with "." : an image file, or a folder not searched)."""
    files, hidden, seen = [], [], set()

    def walk(folder: Path, rel: str) -> None:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:  # a symbolic link back up the tree
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            for e in it:
                visit(e, f"{rel}{e.name}")

    def visit(e, path: str) -> None:
        if e.is_dir():
            if e.name.startswith("."):
                hidden.append(path + "/")
            else:
                walk(Path(e.path), path + "/")
        elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file():
            (hidden if e.name.startswith(".") else files).append(path)

    walk(root, "")
    # sorted by path parts, as sorted(Path) sorts: the same order as comparing with "/" below every character
    files.sort(key=lambda rel: rel.replace("/", "\0"))
    hidden.sort()
    return files, hidden


def decode_image(img, size: int | None, channels: int | None) -> Decoded:
    """A PIL image -> uint8 (C, S, S): EXIF rotation, 16-bit scaling, transparency on white, centre square,
    bicubic resize to ``size`` (None: the shorter side); C = 1 when ``channels`` is 1, else 3 (RGB)."""
    from PIL import Image, ImageOps

    img.load()
    img = ImageOps.exif_transpose(img)
    native, grey, high_bit = img.size, img.mode in GREY_MODES, img.mode in HIGH_BIT_MODES
    if img.mode == "F":
        raise UnsupportedImage("32-bit float pixels (mode F) are not supported: save it as an 8- or 16-bit PNG")
    if high_bit:
        values = np.asarray(img)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 65535:
            raise UnsupportedImage(f"pixel values span [{lo}, {hi}], more than 16 bits: save it as an 8- or "
                                   "16-bit PNG")
        img = Image.fromarray(rescale_to_uint8(values, 65535))  # u = round(v * 255 / 65535)
    rgba = img.convert("RGBA")
    img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
    side = min(img.size)
    size = size or side
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    pixels = np.asarray(img.convert("L"))[None] if channels == 1 else np.asarray(img).transpose(2, 0, 1)
    return Decoded(pixels, grey, high_bit, native)


def open_any(value):
    """A PIL image from a path, ``{"bytes": ..., "path": ...}`` (undecoded datasets images), a PIL image or
    an array."""
    import io

    from PIL import Image

    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    if isinstance(value, dict):
        return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    return value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value, dtype=np.uint8))


def cached_images(source: str, content: str, n: int, get, name, *, image_size, channels, where: str,
                  progress: bool = True, workers: int | None = None):
    """Pixels (a ``cache.PixelFile`` of uint8 (N, C, S, S)), the kept source indices, notes and the cache entry for n
    items ``get(i)`` (anything ``open_any`` takes) named ``name(i)``; warns about what was skipped."""
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive whole number of pixels, got {image_size!r}")

    def decode(i: int, size: int | None) -> Decoded:
        img = open_any(get(i))
        try:
            return decode_image(img, image_size or size, channels)
        finally:
            img.close()

    pixels, meta, entry = get_or_build(source, content, n, decode, name, channels=channels,
                                       auto_size=image_size is None, where=where, progress=progress, workers=workers)
    return pixels, kept_indices(n, meta), _report(meta, where), entry


def _report(meta: dict, where: str) -> list[str]:
    """Warn (every load, from the cache's record) about skipped files and an oversized default size; return
    the notes that ``dforge datasets --check`` prints."""
    notes = []
    if meta["skipped"]:
        msg = skipped_message(meta["skipped"], where)
        warnings.warn(msg, UserWarning, stacklevel=4)
        notes.append(msg)
    if meta["auto_size"] and meta["size"] > LARGE:
        w, h = meta["native"]
        msg = (f"{meta['first']}: images are {w}x{h} pixels and no image_size was given, so the data set is "
               f"{meta['size']}x{meta['size']} per image, far more than a diffusion model needs (and slow); pass a "
               f"size: --set data.image_size={SUGGESTED_SIZE} (image_size={SUGGESTED_SIZE} in Python)")
        warnings.warn(msg, UserWarning, stacklevel=4)
        notes.append(msg)
    if meta["high_bit"]:
        e = meta["high_bit"][0]
        notes.append(f"{len(meta['high_bit'])} image(s) with 16-bit greyscale pixels scaled to 8 bits as "
                     f"round(v * 255 / 65535), e.g. {e}")
    return notes


def load_image_folder(root: str | Path, image_size: int | None = None, channels: int | None = None,
                      flip: bool = False, *, conditioning: str | None = None, progress: bool = True,
                      workers: int | None = None, text_column: str | None = None) -> CachedImageDataset:
    """Every image under ``root`` (recursive; names starting with "." skipped), decoded once into the on-disk
    cache and memory-mapped. If all of them sit in first-level subfolders, those name the classes (labels in
    sorted order; ``cond = {"class_labels": ...}``); otherwise there are no labels (``cond = {}``). Captions
    (``.captions``) come from ``metadata.jsonl`` files (``data.captions.read_metadata``; ``text_column``: their key).
    ``progress``: a progress bar on stderr while the cache is built (first load only)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    files, hidden = list_images(root)
    if not files:
        if hidden:
            shown = ", ".join(hidden[:3]) + (", ..." if len(hidden) > 3 else "")
            raise ValueError(f"no images found in {root}: skipped {len(hidden)} hidden file(s) or folder(s) "
                             f"(names starting with '.': {shown}); rename them without the leading dot to use them")
        raise ValueError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    source = hasher("folder", str(root.resolve()), image_size, channels).hexdigest()
    content = hashlib.sha256()
    for rel in files:  # the key: every file's path, size and mtime (ns)
        file_record(content, rel, os.stat(root / rel))
    pixels, kept, notes, entry = cached_images(
        source, content.hexdigest(), len(files), lambda i: root / files[i], lambda i: str(root / files[i]),
        image_size=image_size, channels=channels, where=str(root), progress=progress, workers=workers)
    classes, labels = None, None
    if all("/" in files[i] for i in kept):  # one first-level sub-folder per class
        classes = sorted({files[i].split("/", 1)[0] for i in kept})
        index = {c: k for k, c in enumerate(classes)}
        labels = torch.tensor([index[files[i].split("/", 1)[0]] for i in kept], dtype=torch.int64)
    from .captions import read_metadata

    captions = read_metadata(root, [files[i] for i in kept], text_column)
    return CachedImageDataset(pixels, labels, flip=flip, classes=classes, name=str(root), conditioning=conditioning,
                              notes=notes, cache_path=entry, captions=captions)
