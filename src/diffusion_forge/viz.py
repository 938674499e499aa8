"""Pictures that teach: schedule curves, data turning into noise, trajectories, sample grids.

Each figure function returns the numbers it drew (so tests can check the data, not only the file)
and writes a PNG atomically. matplotlib is imported lazily with the Agg backend.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .process import q_sample
from .schedules import SCHEDULE_NAMES, NoiseSchedule


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure atomically (temp file + rename); the format follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _plt().close(fig)
    return path


def save_image_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, pad: int = 2) -> Path:
    """Tile uint8 images (N x H x W x C) into one PNG, written atomically."""
    from PIL import Image

    images = np.asarray(images)
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    try:
        Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format="PNG")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def default_schedules(num_timesteps: int = 1000) -> dict[str, NoiseSchedule]:
    """Every named schedule with diffusers' default betas, plus scaled_linear as Stable Diffusion uses it
    and its zero-terminal-SNR rescale."""
    out = {name: NoiseSchedule.from_name(name, num_timesteps) for name in SCHEDULE_NAMES}
    out["scaled_linear (SD)"] = NoiseSchedule.from_name("scaled_linear", num_timesteps, 0.00085, 0.012)
    out["scaled_linear (SD), zero-SNR"] = NoiseSchedule.from_name("scaled_linear", num_timesteps, 0.00085, 0.012,
                                                                   zero_terminal_snr=True)
    return out


def plot_schedules(path, schedules: dict[str, NoiseSchedule] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """alpha_bar_t, SNR_t (log axis) and log-SNR of each schedule against t, in one titled figure.
    Returns the plotted curves: {label: {"alpha_bar": ..., "snr": ..., "log_snr": ...}}."""
    plt = _plt()
    schedules = schedules or default_schedules()
    curves = {k: {"alpha_bar": s.alphas_cumprod.numpy(), "snr": s.snr.numpy(), "log_snr": s.log_snr.numpy()}
              for k, s in schedules.items()}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, c in curves.items():
        t = np.arange(len(c["alpha_bar"]))
        axes[0].plot(t, c["alpha_bar"], label=label)
        axes[1].semilogy(t, np.where(c["snr"] > 0, c["snr"], np.nan), label=label)
        axes[2].plot(t, np.where(np.isfinite(c["log_snr"]), c["log_snr"], np.nan), label=label)
    for ax, title, ylabel in zip(axes, ["signal kept: alpha_bar_t", "signal-to-noise ratio", "log-SNR"],
                                 ["alpha_bar_t", "SNR_t = alpha_bar / (1 - alpha_bar)", "log SNR_t"]):
        ax.set(title=title, xlabel="timestep t", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Noise schedules (zero-terminal-SNR reaches SNR 0, log-SNR -inf, at the last step)")
    save_figure(fig, path)
    return curves


def plot_forward_strip(path, image: torch.Tensor, schedules: dict[str, NoiseSchedule] | None = None,
                       ts=(0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999), seed: int = 0) -> dict:
    """One image (C x H x W in [-1, 1]) at increasing t under each schedule, same noise throughout.
    Returns {label: {"t": ts, "frames": array, "noise_std": std of (x_t - sqrt(ab) x0)}}."""
    plt = _plt()
    schedules = schedules or {k: v for k, v in default_schedules().items() if "SD" not in k}
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    out: dict = {}
    fig, axes = plt.subplots(len(schedules), len(ts), figsize=(1.2 * len(ts), 1.35 * len(schedules)), squeeze=False)
    for row, (label, sched) in enumerate(schedules.items()):
        t = torch.tensor(ts, dtype=torch.float64)
        x0 = image.expand(len(ts), *image.shape).double()
        xt = q_sample(x0, t, noise.expand_as(x0).double(), sched)
        ab = sched.alpha_bar_at(t).reshape(-1, *[1] * image.ndim)
        out[label] = {"t": np.array(ts), "frames": xt.numpy(),
                      "noise_std": (xt - ab.sqrt() * x0).flatten(1).std(1).numpy()}
        for col in range(len(ts)):
            ax = axes[row, col]
            frame = xt[col].clamp(-1, 1).permute(1, 2, 0).numpy() * 0.5 + 0.5
            ax.imshow(frame[..., 0] if frame.shape[-1] == 1 else frame, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(f"t={ts[col]}", fontsize=8)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle("The forward process q(x_t | x_0): data turning into noise")
    save_figure(fig, path)
    return out
