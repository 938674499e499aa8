"""Guidance at increasing scale: the same seeds in every row, one row per scale.

With classifier-free guidance, pred = pred_uncond + w (pred_cond - pred_uncond): the row w = 0 is the
unconditional model, w = 1 the conditional one, and larger w trade variety for fidelity to the class.
Sampling goes through the one seeded loop, ``sampling.generate.generate``: sample i of every row uses
``torch.Generator().manual_seed(seed + i)`` and the same class, so a column shows one seed as w grows.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.convert import to_uint8
from .figures import _lim, _lines, _plt, kind_of, save_figure
from .images import _points, save_image_grid


def guidance_samples(denoisers: dict, n: int, seed: int = 0, cond: dict | None = None, **kwargs) -> dict:
    """{scale: samples (n, *sample_shape)} for ``denoisers`` = {scale: (guided) denoiser}, every one from the
    same seeds (sample i: seed + i) and the same ``cond``, through ``generate`` (``kwargs``: sampler, steps,
    sampler_options, batch_size, device, sigmas, spacing, progress)."""
    from ..sampling.generate import generate

    if not denoisers:
        raise ValueError("denoisers must map at least one scale to a denoiser")
    return {float(s): generate(D, n, seed=seed, cond=cond, **kwargs) for s, D in denoisers.items()}


def plot_guidance(path, samples: dict, labels=None, title: str = "", symbol: str = "w") -> dict:
    """One row per scale (labelled "w = ..."), the same seeds along every row (from :func:`guidance_samples`).
    Images: a grid of rows, the columns named by ``labels`` (the class of each sample, e.g. "class 3");
    vectors: a scatter panel per scale, a colour per label; signals: a panel per scale, the samples overlaid.
    Returns {"scales", "row_labels", "rows", "cols", "kind", and for images "grid_shape" (the tiled grid's
    height, width and channels in image pixels, before enlarging)}."""
    scales = list(samples)
    row_names = [f"{symbol} = {s:g}" for s in scales]
    first = next(iter(samples.values()))
    kind, n = kind_of(first), len(first)
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels must hold one label per sample ({n}), got {len(labels)}")
    layout = {"scales": scales, "row_labels": row_names, "rows": len(scales), "cols": n, "kind": kind}
    title = title or f"Guidance at increasing scale ({symbol}), the same seeds in every row"
    if kind == "image":
        images = np.concatenate([to_uint8(samples[s]) for s in scales])
        per_sample = [name for name in row_names for _ in range(n)]
        pad = 2
        h, w, c = images.shape[1:]
        layout["grid_shape"] = (len(scales) * (h + pad) + pad, n * (w + pad) + pad, c)
        save_image_grid(images, path, pad=pad, title=title, row_labels=per_sample, col_labels=labels)
        return layout
    plt = _plt()
    cols = len(scales)
    fig, axes = plt.subplots(1, cols, figsize=(3.0 * cols, 3.2), squeeze=False, layout="constrained")
    lim = _lim(*samples.values()) if kind == "vector" else None
    for ax, s, name in zip(axes[0], scales, row_names):
        x = torch.as_tensor(samples[s]).float()
        if kind == "vector":
            _points(ax, x.reshape(n, -1).numpy()[:, :2], labels)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim))
        else:
            _lines(ax, x)
        ax.set_title(name, fontsize=10)
    fig.suptitle(title)
    save_figure(fig, path)
    return layout


