"""What every figure shares: matplotlib (lazily, Agg backend), the one way a figure is written, and the
panels that draw one item of each kind of data (an image, a signal, a cloud of points)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..data.convert import to_model_range
from ..io.files import PLOT_SUFFIXES, atomic_write, check_output

DPI = 120
KINDS = {2: "vector", 3: "signal", 4: "image"}   # a batch's ndim -> the kind of data (as datasets' .kind)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def kind_of(batch) -> str:
    """"vector" for (N, D), "signal" for (N, C, L), "image" for (N, C, H, W); anything else is a ValueError."""
    ndim = len(batch.shape)
    if ndim not in KINDS:
        raise ValueError(f"expected a batch of vectors (N, D), signals (N, C, L) or images (N, C, H, W), "
                         f"got shape {tuple(batch.shape)}")
    return KINDS[ndim]


def check_picture(path: str | os.PathLike, suffixes=PLOT_SUFFIXES) -> Path:
    """``path`` as a Path when its suffix is one of ``suffixes`` and it can be written (an existing file is
    overwritten); else a ValueError (``io.files.OutputError``) naming the allowed suffixes."""
    return check_output(path, suffixes, force=True)


def save_figure(fig, path: str | os.PathLike, suffixes=PLOT_SUFFIXES) -> Path:
    """Write a matplotlib figure atomically at 120 dpi; the format follows the suffix (.png, .jpg, .svg)."""
    plt = _plt()
    try:
        path = check_picture(path, suffixes)
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches="tight",
                                                          format=path.suffix.lstrip(".").lower()))
    finally:
        plt.close(fig)


def _image_panel(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """One image (C x H x W float in [-1, 1], or H x W x C uint8) as an H x W (x 3) float array in [0, 1]:
    p = (clamp(x, -1, 1) + 1) / 2."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        x = to_model_range(x[None])[0]
    img = torch.as_tensor(x).detach().float().cpu().clamp(-1, 1).permute(1, 2, 0).numpy() * 0.5 + 0.5
    return img[..., 0] if img.shape[-1] == 1 else img


def _show(ax, x, title: str | None = None, fontsize: int = 8) -> None:
    """One image on ``ax``, pixels as they are (nearest neighbour), no ticks."""
    img = _image_panel(x)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def _lines(ax, x, title: str | None = None, fontsize: int = 8) -> None:
    """One signal (C x L: a line per channel) or several (N x C x L, drawn over each other) on ``ax``."""
    x = torch.as_tensor(x).detach().float().cpu()
    rows = x.reshape(-1, x.shape[-1]).numpy()
    channels = x.shape[-2]
    for i, row in enumerate(rows):
        ax.plot(row, lw=0.8 if len(rows) <= channels else 0.5, alpha=1.0 if len(rows) <= channels else 0.5,
                color=f"C{i % channels}")
    ax.tick_params(labelsize=6)
    if title:
        ax.set_title(title, fontsize=fontsize)


def _panel(ax, x, title: str | None = None, fontsize: int = 8) -> None:
    """One item of image data (C x H x W, or H x W x C uint8) or signal data (C x L)."""
    (_lines if x.ndim == 2 else _show)(ax, x, title, fontsize)


def _lim(*arrays) -> float:
    """A symmetric axis limit that holds 99.5% of the points of every array given."""
    return 1.15 * max(float(torch.as_tensor(a).abs().float().quantile(0.995)) for a in arrays)


def _scatter(ax, pts, lim: float, color: str = "C0", title: str | None = None) -> None:
    pts = torch.as_tensor(pts).float()
    ax.scatter(pts[:, 0], pts[:, 1 if pts.shape[1] > 1 else 0], s=2 if len(pts) > 1000 else 4, alpha=0.5,
               color=color, linewidths=0)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    ax.tick_params(labelsize=6)
    if title:
        ax.set_title(title, fontsize=7)


def _pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), always the first and the last."""
    return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))
