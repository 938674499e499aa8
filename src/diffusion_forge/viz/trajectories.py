"""The reverse process: one sampling run step by step, and samplers side by side from the same seeds.

Sampling goes through the one seeded loop, ``sampling.generate.generate``: sample i uses
``torch.Generator().manual_seed(seed + i)``, so every picture shows exactly what ``dforge sample`` draws.
"""
from __future__ import annotations

import numpy as np

from ..data.convert import to_uint8
from .figures import _lim, _lines, _panel, _pick, _plt, _scatter, kind_of, save_figure
from .images import tile_grid


def _setup(denoiser, schedule, prediction, shape, n):
    """(Denoiser, n, one sample's shape or None) from a Denoiser / loaded run, or from a network with its
    schedule and prediction (today's arguments); ``shape`` = (n, *sample_shape) when given."""
    from ..denoise.denoiser import as_denoiser

    D = as_denoiser(denoiser, schedule, prediction)
    if shape is not None:
        return D, int(shape[0]), tuple(shape[1:])
    return D, int(n), None


def frame_decoder(denoiser, decode: bool = True):
    """x -> what a trajectory picture shows of a step's x_t or x_0 prediction: a latent model's (``.vae`` set:
    a latent run, a pipeline) frames decoded by ``models.vae.decode_latents`` into images in [-1, 1] (x_t as
    the sampler reports it, x sqrt(alpha_bar), so its decoding is that of the noised latent); else x itself."""
    vae = getattr(denoiser, "vae", None) if decode else None
    if vae is None:
        return lambda x: x
    from ..models.vae import decode_latents

    return lambda x: decode_latents(vae, x)


def record_trajectory(denoiser, schedule=None, shape=None, sampler: str | None = None, steps: int = 20,
                      prediction: str | None = None, seed: int = 0, *, n: int = 1, **kwargs) -> dict:
    """Run one sampling pass and keep what the sampler's callback sees at every step.

    ``denoiser``: a Denoiser (or a loaded run); or a network with its ``schedule`` and ``prediction``.
    ``shape``: (n, *sample_shape), or None for ``n`` samples of the denoiser's sample_shape. ``sampler=None``
    picks by the NFE budget ``steps`` (``sampling.registry.resolve_sampler``). Other keyword arguments
    (``sampler_options``, ``cond``, ``sigmas``, ``spacing``, ``device``) go to ``generate``; sample i uses the
    CPU generator seeded ``seed + i``. Returns {"t", "sigma", "x_t", "x0" (lists of tensors, one per step),
    "final" (the sampler's output), "sampler", "steps" (what ran)}. A latent model's frames are decoded
    images, like its output (:func:`frame_decoder`; ``decode=False``: latents throughout)."""
    from ..sampling.generate import generate
    from ..sampling.registry import resolve_sampler

    D, n, sample_shape = _setup(denoiser, schedule, prediction, shape, n)
    sampler, steps, _ = resolve_sampler(sampler, steps, kwargs.get("sampler_options"),
                                        "conditional" if kwargs.get("cond") else "unconditional")
    rec: dict = {"t": [], "sigma": [], "x_t": [], "x0": []}
    decode = frame_decoder(denoiser, kwargs.get("decode", True))

    def callback(info):
        rec["t"].append(float(info["t"]))
        rec["sigma"].append(float(info["sigma"]))
        rec["x_t"].append(decode(info["x_t"].detach().float().cpu().clone()))
        rec["x0"].append(decode(info["x0"].detach().float().cpu().clone()))

    rec["final"] = generate(D, n, seed=seed, sampler=sampler, steps=steps, batch_size=n, callback=callback,
                            sample_shape=sample_shape, **kwargs)
    rec.update(sampler=sampler, steps=steps)
    return rec


def plot_trajectory(path, traj: dict, frames: int = 8, index: int = 0) -> dict:
    """x_t (top row) and the model's x_0 prediction (bottom row) along one sampling run (from
    :func:`record_trajectory`), then the final sample. Images and signals show sample ``index``; 2-D data
    is drawn as scatter plots of every point.
    Returns {"steps": shown step indices, "t": their t, "x_t": frames, "x0": predictions, "final": output}."""
    plt = _plt()
    picks = _pick(len(traj["x_t"]), frames)
    vectors = kind_of(traj["final"]) == "vector"
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
                _panel(ax, x, label, fontsize=7)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    if vectors:
        _scatter(axes[0, -1], final, lim_0, color="C3", title="output x_0 (zoomed)")
    else:
        _panel(axes[0, -1], final, "output x_0", fontsize=7)
    axes[1, -1].axis("off")
    fig.suptitle(f"The reverse process: x_t and the model's x_0 prediction ({traj['sampler']}, {traj['steps']} steps)")
    save_figure(fig, path)
    return {"steps": picks, "t": [traj["t"][i] for i in picks], "x_t": xs, "x0": x0s, "final": final}


def sampler_grid(denoiser, schedule=None, shape=None, samplers=("euler", "heun", "ddim", "dpmpp_2m", "unipc"),
                 steps=(5, 10, 20), prediction: str | None = None, seed: int = 0, *, n: int = 4, **kwargs) -> dict:
    """Samples for every (sampler, step count) from the same seeds (sample i: seed + i), through ``generate``.
    Every sampler name is checked before any sampling. ``denoiser``, ``shape``, ``n`` and keyword
    arguments: as :func:`record_trajectory`. Returns {(sampler, steps): tensor (n, *sample_shape)}."""
    from ..sampling.generate import generate
    from ..sampling.registry import resolve_sampler

    D, n, sample_shape = _setup(denoiser, schedule, prediction, shape, n)
    for name in samplers:
        for k in steps:
            resolve_sampler(name, k, kwargs.get("sampler_options"))   # a bad name or count fails before any work
    return {(name, k): generate(D, n, seed=seed, sampler=name, steps=k, sample_shape=sample_shape, **kwargs)
            for name in samplers for k in steps}


def plot_sampler_grid(path, grid: dict, ncol: int | None = None) -> dict:
    """A figure of samplers (rows) x step counts (columns), each cell the same seeds' samples
    (from :func:`sampler_grid`): images tiled ``ncol`` to a row, signals drawn over each other, 2-D data as
    scatter plots. Returns the grid it drew."""
    plt = _plt()
    samplers = list(dict.fromkeys(k[0] for k in grid))
    steps = sorted(set(k[1] for k in grid))
    fig, axes = plt.subplots(len(samplers), len(steps), figsize=(2.4 * len(steps) + 0.6, 2.4 * len(samplers)),
                             squeeze=False)
    kind = kind_of(next(iter(grid.values())))
    lim = _lim(*grid.values()) if kind == "vector" else None
    for r, name in enumerate(samplers):
        for c, k in enumerate(steps):
            ax = axes[r, c]
            x = grid.get((name, k))
            if x is None:
                ax.axis("off")
                continue
            if kind == "vector":
                _scatter(ax, x, lim)
            elif kind == "signal":
                _lines(ax, x)
            else:
                _panel(ax, tile_grid(to_uint8(x), ncol or int(np.ceil(np.sqrt(len(x)))), pad=1))
            if r == 0:
                ax.set_title(f"{k} steps", fontsize=10)
            if c == 0:
                ax.set_ylabel(name, fontsize=10)
    fig.suptitle("Samplers x step counts, same seeds in every cell")
    save_figure(fig, path)
    return grid
