"""THE uint8 <-> [-1, 1] conversions: every other module goes through these.

A pixel value ``u`` in {0, ..., 255} and the model's value ``x`` in [-1, 1] are related by

    x = u / 127.5 - 1                      (uint8 -> model range; exact for every u: 0 -> -1, 255 -> 1)
    u = round((clamp(x, -1, 1) + 1) * 127.5)    (model range -> uint8; round half away from zero on ties)

and a pixel of a ``b``-bit or otherwise wider source with maximum value ``m`` (65535 for 16 bits, 16 for
scikit-learn's digits) becomes ``u = round(v * 255 / m)``.
"""
from __future__ import annotations

import numpy as np
import torch


def uint8_to_model(u: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 pixels of any layout -> float32 ``x = u / 127.5 - 1`` in [-1, 1], same layout."""
    u = torch.as_tensor(u)
    # x = u / 127.5 - 1, in place on a new float buffer (one per batch; the input is never modified)
    return u.to(torch.float32, copy=True).div_(127.5).sub_(1)


def model_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] of any layout -> uint8 ``u = round((clamp(x, -1, 1) + 1) * 127.5)``, same layout (CPU)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 images (N x H x W or N x H x W x C) -> float32 N x C x H x W in [-1, 1]."""
    u = torch.from_numpy(np.asarray(images_uint8))
    u = u.unsqueeze(1) if u.ndim == 3 else u.permute(0, 3, 1, 2)
    return uint8_to_model(u)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float N x C x H x W in [-1, 1] -> uint8 N x H x W x C (as PIL sees images)."""
    return model_to_uint8(x).permute(0, 2, 3, 1).numpy()


def rescale_to_uint8(values: np.ndarray, max_value: float) -> np.ndarray:
    """Pixels in [0, max_value] (16-bit: 65535) -> uint8 ``u = round(v * (255 / max_value))``, clipped to [0, 255]."""
    return np.clip(np.round(np.asarray(values, dtype=np.float64) * (255 / max_value)), 0, 255).astype(np.uint8)
