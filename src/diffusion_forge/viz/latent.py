"""What latent diffusion trades: an image, its latent channels and its reconstruction, beside the measured cost
of one training step of the same network in pixel space and in latent space (``dforge viz latent RUN``)."""
from __future__ import annotations

import time

import torch

from .figures import _plt, _show, save_figure


def measure_step(model_config: dict, shape, batch: int = 32, repeats: int = 3, cond: dict | None = None) -> dict:
    """The wall-clock seconds of one training step (forward, MSE to a target, backward, AdamW) of
    ``build_model(model_config)`` on a batch of ``shape``: the median of ``repeats`` after one warm-up step,
    on the CPU, with the threads torch has. Returns {"seconds", "params", "shape"}."""
    from ..models import build_model, count_parameters

    torch.manual_seed(0)
    model = build_model(dict(model_config))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, target = torch.randn(batch, *shape), torch.randn(batch, *shape)
    t = torch.rand(batch) * 999
    cond = {k: v[:1].expand(batch, *v.shape[1:]) if v.ndim else v for k, v in (cond or {}).items()}
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = (model(x, t, **cond) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return {"seconds": sorted(times)[len(times) // 2], "params": count_parameters(model), "shape": list(shape)}


def step_costs(trained, batch: int = 32, repeats: int = 3) -> dict:
    """{"pixel": ..., "latent": ...} :func:`measure_step` of a latent run's network on its latents and of the same
    network (type, preset, options) built for the images the latents decode to."""
    from ..training.build import model_config
    from ..training.config import Config

    cfg = Config.from_dict(trained.config)
    latent_shape = tuple(trained.sample_shape)
    meta = getattr(trained.vae, "dforge_meta", {}) or {}
    size = int(meta.get("data_size") or latent_shape[-1] * 2 ** (len(trained.vae.config.block_out_channels) - 1))
    pixel_shape = (int(trained.vae.config.in_channels), size, size)
    k = int(trained.num_classes or 0)
    cond, text_dim = ({"class_labels": torch.zeros(1, dtype=torch.long)} if k else None), None
    text = getattr(trained, "text_encoder", None)
    if text is not None:   # a text run: the empty prompt's token states (1, L, D) feed the cross-attention
        cond, text_dim = {"encoder_hidden_states": text.encode([""])}, text.dim
    return {"latent": measure_step(model_config(cfg, latent_shape, k, text_dim), latent_shape, batch, repeats, cond),
            "pixel": measure_step(model_config(cfg, pixel_shape, k, text_dim), pixel_shape, batch, repeats, cond),
            "batch": batch}


def plot_latent(path, image: torch.Tensor, vae, costs: dict | None = None, title: str = "") -> dict:
    """One figure: the image (C, H, W in [-1, 1]), each latent channel z_c = s mu(x)_c (a shared colour scale),
    the reconstruction decoder(z / s) with its PSNR, and (``costs``, from :func:`step_costs`) a bar per space
    of the training step's seconds. Returns {"latent", "reconstruction", "psnr", "costs"}."""
    from ..models.vae import decode_latents, encode_latents

    z = encode_latents(vae, image[None])[0]
    rec = decode_latents(vae, z[None])[0]
    mse = float((rec - image).pow(2).mean().clamp_min(1e-10))
    psnr = 10 * torch.log10(torch.tensor(4.0 / mse)).item()
    plt = _plt()
    c = z.shape[0]
    cols = 2 + c + (1 if costs else 0)
    fig, axes = plt.subplots(1, cols, figsize=(1.9 * cols + (1.5 if costs else 0), 2.6),
                             gridspec_kw={"width_ratios": [1] * (cols - 1) + [2.2 if costs else 1]})
    _show(axes[0], image, f"image {tuple(image.shape)}")
    lim = float(z.abs().max()) or 1.0
    for i in range(c):
        ax = axes[1 + i]
        ax.imshow(z[i].numpy(), cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"latent {i} ({z.shape[1]}x{z.shape[2]})", fontsize=8)
    _show(axes[1 + c], rec, f"reconstruction\nPSNR {psnr:.1f} dB")
    if costs:
        ax = axes[-1]
        names = ["pixel", "latent"]
        ms = [1000 * costs[n]["seconds"] for n in names]
        ax.bar(names, ms, color=["C1", "C0"])
        for i, n in enumerate(names):
            ax.text(i, ms[i], f"{ms[i]:.0f} ms\n{'x'.join(map(str, costs[n]['shape']))}", ha="center", va="bottom",
                    fontsize=7)
        ax.set_ylabel(f"training step, batch {costs['batch']} (ms)", fontsize=7)
        ax.set_ylim(0, max(ms) * 1.35)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{ms[0] / max(ms[1], 1e-9):.1f}x cheaper in latent space", fontsize=8)
    fig.suptitle(title or f"a {vae.config.latent_channels}-channel latent, {z.numel()} numbers for "
                          f"{image.numel()} pixel values", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return {"latent": z, "reconstruction": rec, "psnr": psnr, "costs": costs}
