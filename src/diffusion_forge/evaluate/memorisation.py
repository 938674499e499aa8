"""Memorisation: the nearest training images of each sample, and the fraction of near-copies."""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from .features import as_model_images


def _shifted(x: torch.Tensor, shift: int) -> list[torch.Tensor]:
    """x (N, C, H, W) translated by every (dy, dx) in [-shift, shift]^2, borders filled with the
    image's own edge values (replicate padding)."""
    if shift == 0:
        return [x]
    h, w = x.shape[-2:]
    padded = F.pad(x, [shift] * 4, mode="replicate")
    return [padded[..., shift + dy: shift + dy + h, shift + dx: shift + dx + w]
            for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)]


def nearest_training(samples, train, k: int = 2, shift: int = 1, chunk: int = 256,
                     progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, its k nearest training images in pixel L2 (images in [0, 1] per channel),
    minimised over translations of the sample by up to ``shift`` pixels (so a copy moved by a pixel
    is still at distance ~0): d(s, t)^2 = min over shifts v of |v|^2 + |t|^2 - 2 v.t.
    Returns (distances (N, k) ascending, indices (N, k)).
    Both sets: float N x C x H x W in [-1, 1] or uint8 N x H x W x C (or vectors N x D, no shifts)."""
    if isinstance(samples, (torch.Tensor, np.ndarray)) and samples.ndim == 2:
        s, t, shift = torch.as_tensor(samples).float(), torch.as_tensor(train).float(), 0
        s, t = s[:, :, None, None], t[:, :, None, None]
    else:
        s, t = (as_model_images(samples) + 1) / 2, (as_model_images(train) + 1) / 2
    if s.shape[1:] != t.shape[1:]:
        raise ValueError(f"samples {tuple(s.shape[1:])} and training images {tuple(t.shape[1:])} differ in shape")
    tf = t.flatten(1)
    t_sq = (tf * tf).sum(1)
    best_d, best_i = [], []
    steps = range(0, len(s), chunk)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=progress, unit="chunk", leave=False, file=sys.stderr)
    for lo in steps:
        d2 = None
        for v in _shifted(s[lo:lo + chunk], shift):
            vf = v.flatten(1)
            dv = (vf * vf).sum(1, keepdim=True) + t_sq[None] - 2 * vf @ tf.T
            d2 = dv if d2 is None else torch.minimum(d2, dv)
        val, idx = d2.clamp(min=0).topk(k, dim=1, largest=False)
        best_d.append(val.sqrt())
        best_i.append(idx)
    return torch.cat(best_d), torch.cat(best_i)


def memorization(samples, train, shift: int = 1, ratio: float = 1 / 3, progress: str | None = None) -> dict:
    """Near-copies of training data: a sample is a near-copy when its nearest training image is closer
    than ``ratio`` (1/3) times the distance to the second nearest, d1 < ratio * d2 (pixel L2, up to
    ``shift`` pixels of translation). Returns {"fraction": near-copy fraction, "copies": bool (N,),
    "ratio": d1 / d2 (N,), "distances": (N, 2), "indices": (N, 2)}."""
    d, i = nearest_training(samples, train, k=2, shift=shift, progress=progress)
    r = d[:, 0] / d[:, 1].clamp(min=1e-12)
    copies = d[:, 0] < ratio * d[:, 1]
    return {"fraction": float(copies.float().mean()), "copies": copies, "ratio": r, "distances": d, "indices": i}
