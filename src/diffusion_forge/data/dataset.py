"""The one data protocol: every data set yields ``(x, cond)``.

    x, cond = ds[i]          # x float32 of shape ds.shape; cond {} or {"class_labels": int64 scalar tensor}
                             # (conditioning="text": {"caption_ids": int64}, an index into ds.captions)
    xb, cond = ds.get_batch(idx)   # xb (B, *ds.shape) float32 in [-1, 1] for images; cond of (B,) tensors
    ds.shape, ds.kind ("image" (C, H, W) | "vector" (D,) | "signal" (C, L)), ds.num_classes,
    ds.has_labels, ds.has_captions

Images are stored as uint8 (in memory, or memory-mapped from the on-disk cache of ``data.cache``) and
converted per batch by ``data.convert.uint8_to_model``: x = u / 127.5 - 1. Vectors and signals are stored
as float32 and returned as they are.
"""
from __future__ import annotations

import torch

from .convert import uint8_to_model

KINDS = {3: "image", 1: "vector", 2: "signal"}  # len(shape of one item) -> kind
CONDITIONING = (None, "none", "class", "text")


class ArrayDataset(torch.utils.data.Dataset):
    """Items ``(x, cond)`` over ``data`` (N, *shape): uint8 images come out float32 in [-1, 1].

    ``labels`` int64 (N,) (-1 = none), ``classes`` their names (or None), ``captions`` a string per item
    (or None), ``notes`` lines about how the data was read (shown by ``dforge datasets --check``).
    ``conditioning``: None (class labels in ``cond`` when the data has them), "none" (``cond`` always {}),
    "class" (labels required), "text" (captions required; ``cond`` is then ``{"caption_ids": i}``, the item's
    index into ``captions``, and holds no class labels).
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, *, flip: bool = False,
                 classes: list[str] | None = None, captions: list[str] | None = None, name: str = "",
                 conditioning: str | None = None, notes: list[str] | None = None):
        if len(data) == 0:
            raise ValueError(f"data set {name!r} is empty")
        if data.ndim - 1 not in KINDS:
            raise ValueError(f"data set {name!r}: items of shape {tuple(data.shape[1:])} are neither images "
                             "(C, H, W), vectors (D,) nor signals (C, L)")
        if flip and data.ndim != 4:
            raise ValueError(f"flip needs images; {name!r} holds {KINDS[data.ndim - 1]}s")
        self.data, self.flip, self.classes, self.captions, self.name = data, flip, classes, captions, name
        self.notes = list(notes or [])
        self.labels = torch.full((len(data),), -1, dtype=torch.int64) if labels is None else labels.long()
        self.set_conditioning(conditioning)

    def set_conditioning(self, conditioning: str | None) -> None:
        """What ``cond`` holds from now on (see the class docstring); "class" needs labels, "text" a caption for
        every item."""
        name = self.name
        if conditioning not in CONDITIONING:
            raise ValueError(f"unknown conditioning {conditioning!r}; choose one of: none, class, text")
        if conditioning == "class" and not self.has_labels:
            raise ValueError(f"conditioning 'class' needs class labels, and {name!r} has none; use a data set with "
                             "labels (a folder with one sub-folder per class, mnist, digits) or conditioning 'none'")
        if conditioning == "text" and not self.has_captions:
            missing = "none" if self.captions is None else f"{sum(c is None for c in self.captions)} items without one"
            raise ValueError(f"conditioning 'text' needs captions for every item, and {name!r} has {missing}; "
                             "caption an image folder with a metadata.jsonl (file_name, text), or use "
                             "conditioning 'class' or 'none'")
        self.conditioning = conditioning

    def __len__(self) -> int:
        return len(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one item's x."""
        return tuple(self.data.shape[1:])

    @property
    def kind(self) -> str:
        """"image" for (C, H, W), "vector" for (D,), "signal" for (C, L)."""
        return KINDS[len(self.shape)]

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    @property
    def has_captions(self) -> bool:
        """Every item has a caption (``.captions``, one string per item)."""
        return self.captions is not None and all(isinstance(c, str) for c in self.captions)

    @property
    def num_classes(self) -> int | None:
        if self.classes:
            return len(self.classes)
        return int(self.labels.max()) + 1 if self.has_labels else None

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        return uint8_to_model(x) if x.dtype == torch.uint8 else x

    def _cond(self, labels: torch.Tensor, idx: torch.Tensor) -> dict:
        if self.conditioning == "text":
            return {"caption_ids": idx}
        return {"class_labels": labels} if self.conditioning != "none" and self.has_labels else {}

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        x = self._convert(self._rows(torch.tensor([int(i)]))[0])
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self._cond(self.labels[i], torch.tensor(int(i)))

    def get_batch(self, idx) -> tuple[torch.Tensor, dict]:
        """A batch ``(x (B, ...), cond)`` for an index tensor or list; flips (images only) drawn per item."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self._convert(self._rows(idx))
        if self.flip:
            x = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x.flip(-1), x)
        return x, self._cond(self.labels[idx], idx)

    def __repr__(self) -> str:
        what = f"{self.num_classes} classes" if self.has_labels else "unlabelled"
        return f"{type(self).__name__}({self.name!r}: {len(self):,} {self.kind}s of shape {self.shape}, {what})"


InMemoryDataset = ArrayDataset  # the name of earlier releases


class CachedImageDataset(ArrayDataset):
    """Images in an entry of the on-disk uint8 cache (``data.cache``): ``data`` is the file memory-mapped, and
    batches are read with positional reads of their own rows only, so memory does not grow with the number of
    images. ``cache_path`` is the entry's folder (None for a temporary entry when the cache was not writable)."""

    def __init__(self, pixels, labels=None, *, cache_path=None, **kw):
        super().__init__(pixels.tensor, labels, **kw)
        self.pixels, self.cache_path = pixels, cache_path

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.pixels.read(idx) if self.pixels is not None else self.data[idx]

    def __getstate__(self):  # pickled (e.g. for DataLoader workers) as the path, never as the pixels
        state = dict(self.__dict__)
        if self.cache_path is not None:
            state["data"] = state["pixels"] = None
        else:
            state["pixels"] = None
        return state

    def __setstate__(self, state):
        from .cache import open_entry

        self.__dict__.update(state)
        if self.cache_path is not None:
            self.pixels = open_entry(self.cache_path)[0]
            self.data = self.pixels.tensor
