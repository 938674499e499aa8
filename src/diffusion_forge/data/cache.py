"""The on-disk uint8 image cache: image sources are decoded once, then memory-mapped and read per batch.

An entry is a folder ``<cache_dir()>/images/<source>-<content>/`` holding

    images.u8   the pixels, uint8, C order (N, C, S, S), no header
    meta.json   {"version", "shape", "skipped": [[index, name, reason], ...], "grey", "high_bit": [names],
                 "first": name, "native": [w, h], "size", "auto_size", "where"}

``source`` hashes what the entry is of (the folder, and the options image_size / channels); ``content``
hashes every file's relative path, size and modification time in nanoseconds (what make and rsync compare),
so an image changed, added or removed gives a new key; the entry of the old key is then deleted.

Building is streamed: one image at a time (a few at once in worker threads) is decoded and appended to the
file, so memory holds a chunk of images, never the data set. The entry is built in a temporary folder
``.<entry>.tmp-<pid>-*``, synced to disk and renamed into place: a killed build leaves only a temporary
folder, which is never read and is removed by the next build once its process is gone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

VERSION = 1
IMAGES, META = "images.u8", "meta.json"
CHUNK = 64  # images decoded at once by the worker threads: the build's working memory


@dataclass
class Decoded:
    """One decoded image: ``pixels`` uint8 (C, S, S); ``grey`` its source mode was grey; ``high_bit`` it had
    more than 8 bits per pixel (rescaled); ``native`` its (width, height) before cropping and resizing."""
    pixels: np.ndarray
    grey: bool
    high_bit: bool
    native: tuple[int, int]


def cache_root() -> Path:
    from ..io.files import cache_dir

    return cache_dir() / "images"


def hasher(*parts) -> "hashlib._Hash":
    """A sha256 started with a JSON description; feed it file records with ``file_record``."""
    h = hashlib.sha256()
    h.update(json.dumps([VERSION, *parts], sort_keys=True, default=str).encode())
    return h


def file_record(h, rel: str, st: os.stat_result) -> None:
    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


def entry_name(source: str, content: str) -> str:
    return f"{source[:16]}-{content[:16]}"


class PixelFile:
    """The pixels of an entry: ``tensor``, the file memory-mapped copy-on-write as uint8 (N, C, S, S) (reads
    never copy it into anonymous memory), and ``read(idx)``, positional reads of just the rows asked for into a
    new tensor, which leave nothing of the file mapped in the process (so not even its resident set grows)."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path, self.shape, self.row = Path(path), shape, int(np.prod(shape[1:]))
        self.fd = os.open(path, os.O_RDONLY)
        self.tensor = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=shape))

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        if not hasattr(os, "preadv"):  # macOS, Windows: through the mapping
            return self.tensor[idx]
        n = self.shape[0]
        out = np.empty((len(idx), self.row), np.uint8)
        for k, i in enumerate(idx.tolist()):
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} images")
            if os.preadv(self.fd, [out[k]], (i % n) * self.row) != self.row:
                raise OSError(f"short read from {self.path}: the image cache was truncated; delete it to rebuild")
        return torch.from_numpy(out.reshape(len(idx), *self.shape[1:]))

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


def open_entry(path: Path) -> tuple[PixelFile, dict]:
    """The pixels and metadata of a complete entry; ``ValueError`` when the entry is missing or damaged."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        shape = tuple(int(s) for s in meta["shape"])
        if meta.get("version") != VERSION or (path / IMAGES).stat().st_size != int(np.prod(shape)):
            raise ValueError("version or size mismatch")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"image cache entry {path} is missing or damaged ({e})") from None
    return PixelFile(path / IMAGES, shape), meta


def kept_indices(n: int, meta: dict) -> range | list[int]:
    """The source indices of the entry's images (all but the skipped ones, in order)."""
    if not meta["skipped"]:
        return range(n)
    skipped = {s[0] for s in meta["skipped"]}
    return [i for i in range(n) if i not in skipped]


def skipped_message(skipped: list, where: str) -> str:
    shown = ", ".join(f"{name} ({reason})" for _, name, reason in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return f"skipped {len(skipped)} unreadable image(s) in {where}: {shown}{more}"


def get_or_build(source: str, content: str, n: int, decode: Callable[[int, int | None], Decoded],
                 name: Callable[[int], str], *, channels: int | None, auto_size: bool, where: str,
                 progress: bool = True, workers: int | None = None) -> tuple[PixelFile, dict, Path | None]:
    """Open the entry for (source, content), building it first when absent. Returns (pixels, meta, entry path);
    the path is None when no cache folder could be written (then the pixels live in an unlinked temporary file)."""
    try:
        root = cache_root()
        entry = root / entry_name(source, content)
        if (entry / META).exists():
            try:
                return (*open_entry(entry), entry)
            except ValueError:
                shutil.rmtree(entry, ignore_errors=True)  # damaged from outside: rebuild
        build_entry(entry, n, decode, name, channels=channels, auto_size=auto_size, where=where,
                    progress=progress, workers=workers)
        return (*open_entry(entry), entry)
    except OSError as e:
        from ..io.files import os_reason

        warnings.warn(f"could not write the image cache ({os_reason(e)}); decoding {where} into a temporary file "
                      "this time: set DFORGE_CACHE to a writable folder to keep it", UserWarning, stacklevel=3)
    tmp_root = Path(tempfile.mkdtemp(prefix="dforge-images-"))
    try:
        entry = tmp_root / "entry"
        build_entry(entry, n, decode, name, channels=channels, auto_size=auto_size, where=where,
                    progress=progress, workers=workers)
        pixels, meta = open_entry(entry)  # its descriptor and mapping keep the file alive once removed
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return pixels, meta, None


def build_entry(entry: Path, n: int, decode: Callable[[int, int | None], Decoded], name: Callable[[int], str], *,
                channels: int | None, auto_size: bool, where: str, progress: bool = True,
                workers: int | None = None) -> Path:
    """Decode items 0..n-1 into a new entry (atomically: a temporary folder renamed into place)."""
    root = entry.parent
    root.mkdir(parents=True, exist_ok=True)
    sweep(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{entry.name}.tmp-{os.getpid()}-"))
    try:
        meta = _write_pixels(tmp, n, decode, name, channels, where, progress, workers)
        meta.update(version=VERSION, auto_size=auto_size, where=where)
        _write_synced(tmp / META, json.dumps(meta).encode())
        _fsync_dir(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / META).exists():  # not another process that finished the same entry first
                raise
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prefix = entry.name.split("-")[0] + "-"
    for old in root.glob(prefix + "*"):  # older versions of the same source (images since changed)
        if old.name != entry.name:
            shutil.rmtree(old, ignore_errors=True)
    return entry


def _decode_or_reason(decode, i: int, size: int | None):
    try:
        return decode(i, size)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        return str(e) if isinstance(e, UnsupportedImage) else type(e).__name__


class UnsupportedImage(ValueError):
    """An image that decodes but cannot be used as it is (its message says why and what to do)."""


def _write_pixels(tmp: Path, n, decode, name, channels, where, progress, workers) -> dict:
    """Stream decoded images into ``tmp/images.u8``; returns the facts for meta.json."""
    from tqdm import tqdm

    skipped, high_bit, grey, first, size = [], [], True, None, None
    raw = tmp / (IMAGES if channels else "rgb.u8")  # channels=None: RGB first, reduced to grey below if all grey
    bar = tqdm(total=n, desc=f"caching {where}", unit="img", file=sys.stderr, disable=not progress,
               mininterval=0.5, dynamic_ncols=True)
    with open(raw, "wb") as f, ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        def take(i, result):
            nonlocal grey, first, size
            if isinstance(result, str):
                skipped.append([i, name(i), result])
                return
            if first is None:
                first, size = {"first": name(i), "native": list(result.native)}, result.pixels.shape[-1]
            grey = grey and result.grey
            if result.high_bit:
                high_bit.append(name(i))
            f.write(np.ascontiguousarray(result.pixels).tobytes())

        i = 0
        while first is None and i < n:  # the first readable image fixes the size when none is given
            take(i, _decode_or_reason(decode, i, None))
            i += 1
            bar.update(1)
        for start in range(i, n, CHUNK):
            stop = min(n, start + CHUNK)
            for j, result in zip(range(start, stop), pool.map(lambda k: _decode_or_reason(decode, k, size),
                                                              range(start, stop))):
                take(j, result)
            bar.update(stop - start)
        f.flush()
        os.fsync(f.fileno())
    bar.close()
    if first is None:
        if skipped:
            warnings.warn(skipped_message(skipped, where), UserWarning, stacklevel=4)
        raise ValueError(f"no readable images in {where} ({len(skipped)} unreadable)")
    count = n - len(skipped)
    c = channels or 3
    if channels is None:
        c = 1 if grey else 3
        _reduce_channels(raw, tmp / IMAGES, (count, 3, size, size), c)
    return dict(shape=[count, c, size, size], skipped=skipped, grey=grey, high_bit=high_bit, size=size, **first)


def _reduce_channels(src: Path, dst: Path, shape: tuple, channels: int) -> None:
    """RGB (N, 3, S, S) -> (N, channels, S, S) in chunks: grey sources have R = G = B, so channel 0 is their
    luma exactly (PIL: L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 = R when R = G = B)."""
    if channels == 3:
        os.replace(src, dst)
        return
    rgb = np.memmap(src, dtype=np.uint8, mode="r", shape=shape)
    with open(dst, "wb") as f:
        for start in range(0, shape[0], 1024):
            f.write(np.ascontiguousarray(rgb[start:start + 1024, :1]).tobytes())
        f.flush()
        os.fsync(f.fileno())
    del rgb
    os.unlink(src)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    from ..io.files import fsync_dir

    fsync_dir(path)


def sweep(root: Path) -> None:
    """Remove the temporary folders of builds whose process is gone (killed, or crashed)."""
    for tmp in root.glob(".*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
            if pid == os.getpid():
                continue
            os.kill(pid, 0)  # raises when no such process exists
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue
