"""Toy 2-D distributions: points in about [-1, 1]^2, a fixed seed per split, labels where they mean something."""
from __future__ import annotations

import math

import numpy as np

TOY_SETS = ("swiss_roll", "moons", "8gaussians", "checkerboard")
# the class names of the toy sets that have labels (the others have none)
TOY_CLASSES = {"moons": ["upper", "lower"], "8gaussians": [str(k) for k in range(8)]}


def toy_2d(name: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points (float32 (n, 2), roughly within [-1, 1]) and labels (int64, -1 = none); same seed, same points.

    swiss_roll: t ~ U(1.5 pi, 4.5 pi), x = (t cos t, t sin t) / 15 + N(0, (0.5 / 15)^2);
    moons: two half circles (label = which), noise 0.05; 8gaussians: N(0.8 (cos k pi/4, sin k pi/4), 0.06^2),
    label k; checkerboard: uniform on the 8 dark squares (row + column even) of a 4 x 4 board over [-1, 1]^2.
    """
    rng = np.random.default_rng(seed)
    labels = np.full(n, -1, dtype=np.int64)
    if name == "swiss_roll":
        t = 1.5 * math.pi * (1 + 2 * rng.random(n))
        x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + 0.5 * rng.standard_normal((n, 2))
        x = x / 15
    elif name == "moons":
        labels = rng.integers(0, 2, n)
        theta = math.pi * rng.random(n)
        upper = np.stack([np.cos(theta), np.sin(theta)], 1)
        lower = np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], 1)
        x = np.where(labels[:, None] == 0, upper, lower) + 0.05 * rng.standard_normal((n, 2))
        x = (x - [0.5, 0.25]) / 1.5
    elif name == "8gaussians":
        labels = rng.integers(0, 8, n)
        angle = labels * (math.pi / 4)
        x = 0.8 * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.06 * rng.standard_normal((n, 2))
    elif name == "checkerboard":
        col, row = rng.integers(0, 4, n), rng.integers(0, 2, n) * 2
        row = row + (col % 2)  # dark squares: row + col even
        x = (np.stack([col, row], 1) + rng.random((n, 2))) / 2 - 1
    else:
        raise ValueError(f"unknown toy set {name!r}; choose one of: {', '.join(TOY_SETS)}")
    return x.astype(np.float32), labels
