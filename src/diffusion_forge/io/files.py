"""Files: the one atomic writer, the one check of an output path, and the one cache folder.

Every file the toolkit writes (checkpoints, pictures, sample archives, cached statistics) goes through
:func:`atomic_write`: written to a temporary file in the same folder, flushed to disk (fsync), then renamed
over the target and the folder synced, so a reader (or a run killed mid-write, or a full disk) sees the old
file or the new one, never half of one.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

# Picture files every command writes: grids and images as .png or .jpg; plots may also be .svg.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PLOT_SUFFIXES = IMAGE_SUFFIXES + (".svg",)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, sync the file, rename it onto ``path`` (mode 0644) and sync the folder.
    On any error (a full disk included) the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class OutputError(ValueError):
    """An output path that cannot or must not be written (exists, wrong kind, read-only folder)."""


def check_output(path: str | os.PathLike, suffixes: Iterable[str] | None = None, force: bool = False) -> Path:
    """Check, before any work is done, that ``path`` can be written as an output file.

    Refuses (with :class:`OutputError`, a message that names the fix): a suffix not in ``suffixes``; a path
    that is a folder; an existing file unless ``force``; a parent that is a file; a folder where files cannot
    be created (read-only file system, no permission). Creates missing parent folders."""
    path = Path(path)
    if suffixes is not None:
        suffixes = tuple(suffixes)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name (e.g. {path / ('out' + (suffixes or ('.png',))[0])})")
    if suffixes is not None:
        if path.suffix.lower() not in suffixes:
            raise OutputError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                              f"use one of: {', '.join(suffixes)}")
    if path.exists() and not force:
        raise OutputError(f"{path} already exists; pass --force to overwrite it, or choose another name")
    check_writable_dir(path.parent)
    return path


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check that files can be created in it (by creating one)."""
    folder = Path(folder)
    top = missing_ancestor(folder)
    existing = folder if top is None else top.parent     # the nearest folder of the path that exists
    if not existing.is_dir():
        raise OutputError(f"{existing} is a file, not a folder; choose an output path outside it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dforge-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write in {folder}: {os_reason(e)}; choose another output folder") from None
    return folder


def missing_ancestor(folder: str | os.PathLike) -> Path | None:
    """The topmost folder of ``folder``'s path (itself included) that does not exist yet; None if it exists."""
    folder = Path(folder)
    missing = None
    for path in [folder, *folder.parents]:
        if path.exists():
            break
        missing = path
    return missing


def remove_empty_new_dirs(folder: str | os.PathLike, top: Path | None) -> None:
    """Undo check_writable_dir's mkdir after a failure: remove ``folder`` and its parents up to ``top`` (as
    returned by :func:`missing_ancestor` before the mkdir) while they are empty. Anything written stays."""
    if top is None:
        return
    path = Path(folder)
    while True:
        try:
            path.rmdir()            # only ever removes an empty folder
        except OSError:
            return
        if path == top:
            return
        path = path.parent


def os_reason(e: OSError) -> str:
    """A short human reason for an OS error (full disk, read-only file system, permission, ...)."""
    reasons = {errno.ENOSPC: "no space left on the device (the disk is full)", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EDQUOT: "disk quota exceeded", errno.EEXIST: "a file of that name exists",
               errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EISDIR: "it is a folder"}
    return reasons.get(e.errno, e.strerror or str(e))


def cache_dir() -> Path:
    """The one cache folder: ``$DFORGE_CACHE`` or ``~/.cache/diffusion_forge`` (created on demand)."""
    path = Path(os.environ.get("DFORGE_CACHE") or Path.home() / ".cache" / "diffusion_forge")
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_key(obj) -> str:
    """A short stable hash of a JSON-able description (what produced a cache entry)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
