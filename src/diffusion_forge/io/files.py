"""Files: the one atomic writer and the one cache folder.

Every file the toolkit writes (checkpoints, pictures, sample archives, cached statistics) goes through
:func:`atomic_write`: written to a temporary file in the same folder, then renamed over the target, so
a reader (or a run killed mid-write) sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path`` (mode 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def cache_dir() -> Path:
    """The one cache folder: ``$DFORGE_CACHE`` or ``~/.cache/diffusion_forge`` (created on demand)."""
    path = Path(os.environ.get("DFORGE_CACHE") or Path.home() / ".cache" / "diffusion_forge")
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_key(obj) -> str:
    """A short stable hash of a JSON-able description (what produced a cache entry)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
