"""Figures of the process itself: schedule curves, data turning into noise (images, signals and 2-D points),
and the closest sample / training pairs of a memorisation check."""
from __future__ import annotations

import numpy as np
import torch

from ..core.process import q_sample
from ..core.schedules import SCHEDULE_NAMES, NoiseSchedule
from .figures import _panel, _plt, _show, save_figure


def default_schedules(num_timesteps: int = 1000) -> dict[str, NoiseSchedule]:
    """Every named schedule with diffusers' default betas, plus scaled_linear as Stable Diffusion uses it
    and its zero-terminal-SNR rescale."""
    out = {name: NoiseSchedule.from_name(name, num_timesteps) for name in SCHEDULE_NAMES}
    out["scaled_linear (SD)"] = NoiseSchedule.from_name("scaled_linear", num_timesteps, 0.00085, 0.012)
    out["scaled_linear (SD), zero-SNR"] = NoiseSchedule.from_name("scaled_linear", num_timesteps, 0.00085, 0.012,
                                                                   zero_terminal_snr=True)
    return out


def plot_schedules(path, schedules: dict[str, NoiseSchedule] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """alpha_bar_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t) (log axis) and log-SNR of each schedule against t,
    in one titled figure. Returns the plotted curves: {label: {"alpha_bar": ..., "snr": ..., "log_snr": ...}}."""
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
    """One item (an image C x H x W, or a signal C x L, in [-1, 1]) at increasing t under each schedule,
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with the same eps throughout.
    Returns {label: {"t": ts, "frames": array, "noise_std": std of (x_t - sqrt(ab) x0)}}."""
    plt = _plt()
    image = torch.as_tensor(image)
    schedules = schedules or {k: v for k, v in default_schedules().items() if "SD" not in k}
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    out: dict = {}
    fig, axes = plt.subplots(len(schedules), len(ts), figsize=(1.2 * len(ts), 1.35 * len(schedules)), squeeze=False,
                             sharey=image.ndim == 2)
    for row, (label, sched) in enumerate(schedules.items()):
        t = torch.tensor(ts, dtype=torch.float64)
        x0 = image.expand(len(ts), *image.shape).double()
        xt = q_sample(x0, t, noise.expand_as(x0).double(), sched)
        ab = sched.alpha_bar_at(t).reshape(-1, *[1] * image.ndim)
        out[label] = {"t": np.array(ts), "frames": xt.numpy(),
                      "noise_std": (xt - ab.sqrt() * x0).flatten(1).std(1).numpy()}
        for col in range(len(ts)):
            ax = axes[row, col]
            _panel(ax, xt[col], f"t={ts[col]}" if row == 0 else None)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle("The forward process q(x_t | x_0): data turning into noise (one noise draw for every panel)")
    save_figure(fig, path)
    return out


def plot_forward_2d(path, points: np.ndarray, schedule: NoiseSchedule | None = None,
                    ts=(0, 100, 200, 300, 400, 500, 700, 999), seed: int = 0, title: str = "") -> dict:
    """A 2-D point cloud x_0 (N x 2) at increasing t under q(x_t | x_0), next to N(0, I).
    Returns {"t": ts, "points": [N x 2 per t], "alpha_bar": [...]}."""
    plt = _plt()
    schedule = schedule or NoiseSchedule.from_name("cosine", 1000)
    x0 = torch.as_tensor(np.asarray(points), dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    frames = [q_sample(x0, torch.full((len(x0),), float(t), dtype=torch.float64), noise, schedule).numpy() for t in ts]
    gauss = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).numpy()
    fig, axes = plt.subplots(1, len(ts) + 1, figsize=(2.1 * (len(ts) + 1), 2.5), sharex=True, sharey=True)
    lim = max(3.0, float(np.abs(x0.numpy()).max()) * 1.1)
    for ax, t, pts in zip(axes, ts, frames):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color="C0")
        ax.set_title(f"t={t}  (alpha_bar={float(schedule.alphas_cumprod[t]):.2f})", fontsize=7)
    axes[-1].scatter(gauss[:, 0], gauss[:, 1], s=1, alpha=0.4, color="C3")
    axes[-1].set_title("N(0, I) for comparison", fontsize=7)
    for ax in axes:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="x1")
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("x2")
    fig.suptitle(title or f"The forward process on 2-D data: the distribution turns into a Gaussian ({schedule.name})")
    save_figure(fig, path)
    return {"t": np.array(ts), "points": frames, "alpha_bar": schedule.alphas_cumprod[list(ts)].numpy()}


def plot_nearest_pairs(path, samples, train, mem: dict, top: int = 8) -> dict:
    """The ``top`` samples closest to a training image (smallest d1 / d2) above their nearest training
    images, titled with the distance ratio; near-copies (ratio < 1/3) are marked.
    ``samples``, ``train``: uint8 N x H x W x C; ``mem``: from ``evaluate.memorization``.
    Returns {"order": sample indices shown, "train_index": their nearest training images, "ratio": ...}."""
    plt = _plt()
    ratio = torch.as_tensor(mem["ratio"])
    order = torch.argsort(ratio)[:top].tolist()
    fig, axes = plt.subplots(2, len(order), figsize=(1.6 * len(order) + 0.8, 3.8), squeeze=False)
    for col, i in enumerate(order):
        j = int(mem["indices"][i, 0])
        flag = "COPY " if bool(mem["copies"][i]) else ""
        _show(axes[0, col], np.asarray(samples[i]), f"{flag}#{i}\nd1/d2={float(ratio[i]):.2f}", fontsize=7)
        _show(axes[1, col], np.asarray(train[j]), f"train #{j}\nd1={float(mem['distances'][i, 0]):.2f}", fontsize=7)
    axes[0, 0].set_ylabel("sample", fontsize=9)
    axes[1, 0].set_ylabel("nearest training", fontsize=9)
    fig.suptitle(f"Closest sample / training pairs (near-copies: {mem['fraction']:.2%} of {len(ratio)} samples; "
                 f"copy = d1 < d2 / 3)")
    save_figure(fig, path)
    return {"order": order, "train_index": [int(mem["indices"][i, 0]) for i in order],
            "ratio": [float(ratio[i]) for i in order]}
