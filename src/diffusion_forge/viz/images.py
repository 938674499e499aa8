"""Samples as pictures, by the kind of data: images as a tile grid (plain, or titled and enlarged so that
28-32 px tiles can be read), vectors as a scatter plot, signals as line plots."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..data.convert import to_uint8
from ..io.files import IMAGE_SUFFIXES, PLOT_SUFFIXES, atomic_write
from .figures import _lines, _plt, check_picture, kind_of, save_figure

MIN_TILE = 64   # the titled grid enlarges tiles (nearest neighbour, by a whole factor) to at least this many px


def tile_grid(images: np.ndarray, per_row: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile N x H x W x C images into one array, ``per_row`` to a row (default ceil(sqrt(N))), with ``pad``
    pixels of ``fill`` between and around them."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    per_row = per_row or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / per_row))
    grid = np.full((rows * (h + pad) + pad, per_row * (w + pad) + pad, c), fill, dtype=images.dtype)
    for i, img in enumerate(images):
        r, q = divmod(i, per_row)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top:top + h, left:left + w] = img
    return grid


def group_rows(row_labels) -> list[tuple[str, list[int]]]:
    """Per-sample labels -> [(label, indices of its samples)], one row per distinct label, in the order of
    first appearance (labels i mod K give rows 0, 1, ..., K-1)."""
    rows: dict[str, list[int]] = {}
    for i, label in enumerate(row_labels):
        rows.setdefault(str(label), []).append(i)
    return list(rows.items())


def tile_rows(rows: list[np.ndarray], pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile a list of image rows (each n_r x H x W x C) into one array: row r holds row r's images, left to
    right; rows shorter than the longest end in ``fill``."""
    per_row = max(len(r) for r in rows)
    h, w, c = rows[0].shape[1:]
    grid = np.full((len(rows) * (h + pad) + pad, per_row * (w + pad) + pad, c), fill, dtype=rows[0].dtype)
    for r, images in enumerate(rows):
        for q, img in enumerate(images):
            top, left = pad + r * (h + pad), pad + q * (w + pad)
            grid[top:top + h, left:left + w] = img
    return grid


def _write_plain(grid: np.ndarray, path: Path) -> Path:
    from PIL import Image

    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if path.suffix.lower() == ".png":
        return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    picture = picture.convert("RGB") if picture.mode not in ("L", "RGB") else picture
    return atomic_write(path, lambda tmp: picture.save(tmp, format="JPEG", quality=95))


def save_image_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, pad: int = 2,
                    title: str | None = None, row_labels=None, col_labels=None) -> Path:
    """Tile uint8 images (N x H x W x C) ``nrow`` to a row into one picture (.png or .jpg), written atomically.

    ``title=None``: the plain tile grid, one pixel per image pixel. A title (even ""): a titled figure whose
    tiles are enlarged by the whole factor k = ceil(64 / min(H, W)) (nearest neighbour: each pixel becomes
    a k x k block), so small tiles can be read.
    ``row_labels``: one label per image; images sharing a label form one row (:func:`group_rows`), named at
    its left in a titled grid (e.g. "class 3", "w = 2"). ``col_labels``: names written above the columns."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
    path = check_picture(path, IMAGE_SUFFIXES)
    rows = None
    if row_labels is not None:
        if len(row_labels) != len(images):
            raise ValueError(f"row_labels must hold one label per image ({len(images)}), got {len(row_labels)}")
        rows = group_rows(row_labels)
        grid = tile_rows([images[idx] for _, idx in rows], pad)
    else:
        grid = tile_grid(images, nrow, pad)
    if title is None:
        return _write_plain(grid, path)
    k = max(1, math.ceil(MIN_TILE / min(images.shape[1:3])))
    big = grid.repeat(k, axis=0).repeat(k, axis=1)          # nearest-neighbour upscaling by k
    plt = _plt()
    h, w = big.shape[:2]
    band = (36 if title else 0) + (20 if col_labels else 0)   # pixels above the grid for the title (and columns)
    left = 90 if rows else 0                                   # pixels left of the grid for the row labels
    fig = plt.figure(figsize=((w + left) / 120, (h + band) / 120))
    ax = fig.add_axes((left / (w + left), 0, w / (w + left), h / (h + band)))
    ax.imshow(big[..., 0] if big.shape[-1] == 1 else big, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    th, tw = images.shape[1] * k, images.shape[2] * k          # a tile, enlarged; pad * k between tiles
    for r, (label, _) in enumerate(rows or []):                # centre of row r: (pad + r (H + pad) + H / 2) k
        ax.text(-6, pad * k + r * (th + pad * k) + th / 2, label, ha="right", va="center", fontsize=9,
                clip_on=False)
    for q, label in enumerate(col_labels or []):
        ax.text(pad * k + q * (tw + pad * k) + tw / 2, -4, str(label), ha="center", va="bottom", fontsize=8,
                clip_on=False)
    if title:
        fig.text(0.5, 1 - 18 / (h + band), title, ha="center", va="center", fontsize=10)
    return save_figure(fig, path, IMAGE_SUFFIXES)


def _points(ax, pts: np.ndarray, labels=None) -> None:
    """A scatter (a histogram when D = 1) of points on ``ax``; ``labels`` (one per point): a colour and a
    legend entry per label."""
    groups = group_rows(labels) if labels is not None else [(None, list(range(len(pts))))]
    for j, (label, idx) in enumerate(groups):
        kwargs = {"label": label} if label is not None else {}
        if pts.shape[1] == 1:
            ax.hist(pts[idx, 0], bins=min(100, max(10, len(idx) // 20)), alpha=0.6, color=f"C{j % 10}", **kwargs)
        else:
            ax.scatter(pts[idx, 0], pts[idx, 1], s=4, alpha=0.6, color=f"C{j % 10}", **kwargs)
    if pts.shape[1] == 1:
        ax.set(xlabel="x1", ylabel="count")
    else:
        ax.set(xlabel="x1", ylabel="x2", aspect="equal")
    if labels is not None and len(groups) <= 12:
        ax.legend(fontsize=7, markerscale=2, loc="best")


def plot_points(path, x, title: str = "", labels=None) -> dict:
    """Vectors (N, D) as a scatter plot of the first two coordinates (a histogram when D = 1); ``labels``
    (one per point, e.g. "class 1"): a colour per label, with a legend.
    Returns {"points": the (N, min(D, 2)) coordinates drawn}."""
    pts = torch.as_tensor(x).detach().float().cpu().reshape(len(x), -1).numpy()[:, :2]
    check_picture(path)
    if labels is not None and len(labels) != len(pts):
        raise ValueError(f"labels must hold one label per point ({len(pts)}), got {len(labels)}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    _points(ax, pts, labels)
    ax.set_title(title or f"{len(pts)} samples")
    save_figure(fig, path)
    return {"points": pts}


def plot_signals(path, x, title: str = "", max_panels: int = 16, panel_titles=None) -> dict:
    """Signals (N, C, L): one panel per sample (the first ``max_panels``), a line per channel, value against
    position, shared value axis; ``panel_titles`` (one per sample) added to each panel's name.
    Returns {"shown": sample indices, "lines": (shown, C, L) values drawn}."""
    x = torch.as_tensor(x).detach().float().cpu()
    check_picture(path)
    shown = list(range(min(len(x), max_panels)))
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    plt = _plt()
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False, sharex=True, sharey=True)
    for ax, i in zip(axes.flat, shown):
        _lines(ax, x[i], f"sample {i}" + (f", {panel_titles[i]}" if panel_titles is not None else ""))
    for j, ax in enumerate(axes.flat):
        if j >= len(shown):
            ax.axis("off")
        elif j + cols >= len(shown):                      # the lowest panel of its column: label the axis
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("position", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("value", fontsize=8)
    channels = f", {x.shape[1]} channels (a colour each)" if x.shape[1] > 1 else ""
    fig.suptitle(title or f"{len(x)} signals of length {x.shape[2]}{channels}")
    save_figure(fig, path)
    return {"shown": shown, "lines": x[shown].numpy()}


def sample_suffixes(sample_shape) -> tuple[str, ...]:
    """The picture suffixes :func:`save_samples` writes for samples of one item's ``sample_shape``: a grid for
    images (C, H, W): .png or .jpg; a plot for vectors (D,) and signals (C, L): also .svg. For checking an
    output path before any sampling."""
    return IMAGE_SUFFIXES if len(tuple(sample_shape)) == 3 else PLOT_SUFFIXES


def save_samples(x, path: str | os.PathLike, title: str = "", raw: bool = False, row_labels=None) -> Path:
    """Samples as a picture, by the kind of data:

    * images (N, C, H, W) in [-1, 1]: a titled grid with enlarged tiles (``raw=True``: the plain tile grid,
      one pixel per pixel), .png or .jpg;
    * vectors (N, D): a scatter plot of the first two coordinates; signals (N, C, L): line plots
      (.png, .jpg or .svg).
    ``title`` names the picture (the trainer's holds the run and the step). ``row_labels``: one label per
    sample (e.g. "class 3" for class i mod K): images get one row per label, named at its left; vectors a
    colour per label; signals the label in each panel's title. Returns the path written."""
    x = torch.as_tensor(x)
    kind = kind_of(x)
    check_picture(path, sample_suffixes(x.shape[1:]))
    if row_labels is not None and len(row_labels) != len(x):
        raise ValueError(f"row_labels must hold one label per sample ({len(x)}), got {len(row_labels)}")
    if kind == "image":
        return save_image_grid(to_uint8(x), path, title=None if raw else title, row_labels=row_labels)
    if raw:
        raise ValueError(f"raw=True draws a plain grid of images; these samples are {kind}s of shape "
                         f"{tuple(x.shape)}: leave raw off")
    if kind == "vector":
        plot_points(path, x, title, labels=row_labels)
    else:
        plot_signals(path, x, title, panel_titles=row_labels)
    return Path(path)
