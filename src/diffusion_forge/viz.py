"""Pictures that teach: schedule curves, data turning into noise, trajectories, sample grids.

Each figure function returns the numbers it drew (so tests can check the data, not only the file)
and writes a PNG atomically. matplotlib is imported lazily with the Agg backend.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .io.files import atomic_write
from .core.process import q_sample
from .core.schedules import SCHEDULE_NAMES, NoiseSchedule


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure atomically; the format follows the suffix (.png, .svg, ...)."""
    path = Path(path)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight",
                                                          format=path.suffix.lstrip(".") or "png"))
    finally:
        _plt().close(fig)


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
    return atomic_write(path, lambda tmp: Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format="PNG"))


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
    fig.suptitle("The forward process q(x_t | x_0): data turning into noise (one noise draw for every panel)")
    save_figure(fig, path)
    return out


def _image_panel(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """One image (C x H x W float in [-1, 1], or H x W x C uint8) as an H x W (x 3) float array in [0, 1]."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        img = x.astype(np.float32) / 255
    else:
        img = torch.as_tensor(x).detach().float().cpu().clamp(-1, 1).permute(1, 2, 0).numpy() * 0.5 + 0.5
    return img[..., 0] if img.shape[-1] == 1 else img


def _show(ax, x, title: str | None = None, fontsize: int = 8) -> None:
    img = _image_panel(x)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def _tile(images: torch.Tensor, ncol: int) -> torch.Tensor:
    """Tile a batch (N x C x H x W) into one C x H' x W' image with a 1-pixel light border."""
    n, c, h, w = images.shape
    nrow = int(np.ceil(n / ncol))
    out = torch.ones(c, nrow * (h + 1) + 1, ncol * (w + 1) + 1)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        out[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = img
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


def record_trajectory(model, schedule: NoiseSchedule, shape, sampler: str = "dpmpp_2m", steps: int = 20,
                      prediction: str = "epsilon", seed: int = 0, **kwargs) -> dict:
    """Run one sampling pass and keep what the sampler's callback sees at every step.
    Sample i uses a CPU generator seeded ``seed + i``. Returns {"t", "sigma", "x_t", "x0" (lists of
    tensors, one per step), "final" (the sampler's output)}."""
    from . import sample

    rec: dict = {"t": [], "sigma": [], "x_t": [], "x0": []}

    def callback(info):
        rec["t"].append(float(info["t"]))
        rec["sigma"].append(float(info["sigma"]))
        rec["x_t"].append(info["x_t"].detach().float().cpu().clone())
        rec["x0"].append(info["x0"].detach().float().cpu().clone())

    gens = [torch.Generator().manual_seed(seed + i) for i in range(shape[0])]
    rec["final"] = sample(model, schedule, shape, sampler=sampler, steps=steps, prediction=prediction,
                          generator=gens, callback=callback, **kwargs).detach().float().cpu()
    rec.update(sampler=sampler, steps=steps)
    return rec


def _lim(*arrays) -> float:
    """A symmetric axis limit that holds 99.5% of the points of every array given."""
    return 1.15 * max(float(torch.as_tensor(a).abs().float().quantile(0.995)) for a in arrays)


def _scatter(ax, pts, lim: float, color: str = "C0", title: str | None = None) -> None:
    pts = torch.as_tensor(pts).float()
    ax.scatter(pts[:, 0], pts[:, 1], s=2 if len(pts) > 1000 else 4, alpha=0.5, color=color, linewidths=0)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    ax.tick_params(labelsize=6)
    if title:
        ax.set_title(title, fontsize=7)


def _pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), always the first and the last."""
    return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))


def plot_trajectory(path, traj: dict, frames: int = 8, index: int = 0) -> dict:
    """x_t (top row) and the model's x_0 prediction (bottom row) along one sampling run (from
    :func:`record_trajectory`), then the final sample. 2-D data is drawn as scatter plots.
    Returns {"steps": shown step indices, "t": their t, "x_t": frames, "x0": predictions, "final": output}."""
    plt = _plt()
    picks = _pick(len(traj["x_t"]), frames)
    vectors = traj["final"].ndim == 2
    xs = [traj["x_t"][i] if vectors else traj["x_t"][i][index] for i in picks]
    x0s = [traj["x0"][i] if vectors else traj["x0"][i][index] for i in picks]
    final = traj["final"] if vectors else traj["final"][index]
    cols = len(picks) + 1
    fig, axes = plt.subplots(2, cols, figsize=(1.9 * cols, 4.2), squeeze=False)
    lim_t, lim_0 = (_lim(xs[0]), _lim(final, *x0s[1:])) if vectors else (None, None)
    for col, i in enumerate(picks):
        for row, (x, name) in enumerate([(xs[col], "x_t"), (x0s[col], "predicted x_0")]):
            ax = axes[row, col]
            label = f"step {i}, t={traj['t'][i]:.0f}" if row == 0 else None
            if vectors:
                _scatter(ax, x, lim_t if row == 0 else lim_0, title=label)
            else:
                _show(ax, x, label, fontsize=7)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    if vectors:
        _scatter(axes[0, -1], final, lim_0, color="C3", title="output x_0 (zoomed)")
    else:
        _show(axes[0, -1], final, "output x_0", fontsize=7)
    axes[1, -1].axis("off")
    fig.suptitle(f"The reverse process: x_t and the model's x_0 prediction ({traj['sampler']}, {traj['steps']} steps)")
    save_figure(fig, path)
    return {"steps": picks, "t": [traj["t"][i] for i in picks], "x_t": xs, "x0": x0s, "final": final}


def sampler_grid(model, schedule: NoiseSchedule, shape, samplers=("euler", "heun", "ddim", "dpmpp_2m", "unipc"),
                 steps=(5, 10, 20), prediction: str = "epsilon", seed: int = 0, **kwargs) -> dict:
    """Samples for every (sampler, step count) from the same seeds (sample i: seed + i).
    Returns {(sampler, steps): tensor of ``shape``}."""
    from . import sample

    out = {}
    for name in samplers:
        for n in steps:
            gens = [torch.Generator().manual_seed(seed + i) for i in range(shape[0])]
            out[(name, n)] = sample(model, schedule, shape, sampler=name, steps=n, prediction=prediction,
                                    generator=gens, **kwargs).detach().float().cpu()
    return out


def plot_sampler_grid(path, grid: dict, ncol: int | None = None) -> dict:
    """A figure of samplers (rows) x step counts (columns), each cell the same seeds' samples
    (from :func:`sampler_grid`). 2-D data is drawn as scatter plots. Returns the grid it drew."""
    plt = _plt()
    samplers = list(dict.fromkeys(k[0] for k in grid))
    steps = sorted(set(k[1] for k in grid))
    fig, axes = plt.subplots(len(samplers), len(steps), figsize=(2.4 * len(steps) + 0.6, 2.4 * len(samplers)),
                             squeeze=False)
    vectors = next(iter(grid.values())).ndim == 2
    lim = _lim(*grid.values()) if vectors else None
    for r, name in enumerate(samplers):
        for c, n in enumerate(steps):
            ax = axes[r, c]
            x = grid.get((name, n))
            if x is None:
                ax.axis("off")
                continue
            if x.ndim == 2:
                _scatter(ax, x, lim)
            else:
                _show(ax, _tile(x, ncol or int(np.ceil(np.sqrt(len(x))))))
            if r == 0:
                ax.set_title(f"{n} steps", fontsize=10)
            if c == 0:
                ax.set_ylabel(name, fontsize=10)
    fig.suptitle("Samplers x step counts, same seeds in every cell")
    save_figure(fig, path)
    return grid


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
