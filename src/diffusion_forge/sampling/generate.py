"""THE seeded, batched generation loop: the trainer's grids, evaluation, viz, the CLI and the demo use it.

Sample i is drawn with its own CPU generator ``torch.Generator().manual_seed(seed + i)``, so a sample depends
on its seed only, not on ``n`` or ``batch_size``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..denoise.denoiser import as_denoiser
from ..device import model_device_dtype
from .api import check_cond, sample, sampling_autocast_dtype
from .brownian import check_noise
from .registry import resolve_sampler

__all__ = ["generate", "slice_cond", "data_class_labels"]

LABEL_STREAM = 0x1ABE1   # labels come from their own random stream, independent of the noise of seed + i


def data_class_labels(frequencies, n: int, seed: int = 0) -> torch.Tensor:
    """int64 (n,): class labels drawn i.i.d. from ``frequencies`` p(c) (the training set's class shares, which a
    class-conditional run records), so that x ~ p(x | c) with them is a sample of the data distribution
    p(x) = sum_c p(c) p(x | c). Sample i's label is the inverse CDF of u_i ~ U[0, 1) from a generator of its own
    seeded by (seed + i, LABEL_STREAM): like its noise, it depends on its seed only, not on ``n``."""
    import numpy as np

    p = np.asarray(frequencies, dtype=np.float64)
    if p.ndim != 1 or len(p) < 1 or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"frequencies must be K >= 1 non-negative numbers with a positive sum, got {frequencies!r}")
    cdf = np.cumsum(p / p.sum())
    u = np.array([np.random.default_rng([LABEL_STREAM, (seed + i) % 2 ** 63]).random() for i in range(n)])
    return torch.from_numpy(np.minimum(np.searchsorted(cdf, u, side="right"), len(p) - 1)).long()


def slice_cond(cond: dict, lo: int, hi: int, n: int) -> dict:
    """The rows lo..hi of a cond dict of per-sample values (tensors, lists or tuples of length n)."""
    out = {}
    for key, value in cond.items():
        per_sample = isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.ndim > 0)
        if not per_sample or len(value) != n:
            size = len(value) if per_sample else f"one {type(value).__name__} for all (give one per sample)"
            raise ValueError(f"cond[{key!r}] must hold one value per sample (length {n}), got {size}")
        out[key] = value[lo:hi]
    return out


@torch.no_grad()
def generate(denoiser, n: int, seed: int = 0, sampler: str | None = None, steps: int = 20,
             sampler_options: dict | None = None, cond: dict | None = None, batch_size: int = 256, device=None,
             progress: bool = False, callback: Callable | None = None, sigmas: str = "default",
             spacing: str = "trailing", sample_shape=None, guidance_scale: float | None = None,
             guidance_rescale: float = 0.0, guidance_interval: tuple[float, float] | None = None,
             decode: bool = True, precision: str = "no", noise: str = "independent") -> torch.Tensor:
    """``n`` samples from a (wrapped) Denoiser (a loaded run is one), as a float32 CPU tensor of shape
    (n, *sample_shape), in the denoiser's space; a latent model (``denoiser.vae`` set: a latent run, a pipeline)
    returns images instead, each batch decoded by ``models.vae.decode_latents`` (``decode=False``: the latents).

    Sample i uses ``torch.Generator().manual_seed(seed + i)``. ``sampler``, ``steps``, ``sampler_options``:
    as :func:`diffusion_forge.sample` (None: the sampler for the NFE budget ``steps``). ``cond``: a dict of
    per-sample tensors of length n, sliced per batch. ``sample_shape`` defaults to ``denoiser.sample_shape``.
    ``callback`` gets each step's dict of every batch, with ``"batch": (lo, hi)`` added. ``progress``: a
    tqdm bar (stderr) over the sampler's steps of every batch, the samples done in its postfix.
    ``guidance_scale``, ``guidance_rescale``, ``guidance_interval``: classifier-free
    guidance, as :func:`diffusion_forge.sample` (pred = pred_uncond + w (pred_cond - pred_uncond)); other
    guidance: pass a wrapped denoiser. ``precision``: "no" (default, the network's own dtype), "bf16", "fp16"
    (CUDA only) or "auto" (bf16 where the hardware has it), as :func:`diffusion_forge.sample`: only the network's
    forward runs under autocast, the samplers' arithmetic and the per-sample noise are unchanged, so a seed
    still gives the same sample whatever the batch. ``noise``: "independent" or "brownian" (one Brownian path per
    seed, so a seed gives nearly the same image at every step count), as :func:`diffusion_forge.sample`. The
    denoiser runs in eval mode (its training flag is restored after)."""
    D = as_denoiser(denoiser)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    shape = sample_shape if sample_shape is not None else D.sample_shape
    if shape is None:
        raise ValueError("the denoiser has no sample_shape; pass sample_shape= (one sample's shape, e.g. (1, 28, 28))")
    shape = tuple(int(v) for v in shape)
    cond = check_cond(cond)
    device = model_device_dtype(D, device)[0]
    sampling_autocast_dtype(precision, device)                     # a bad precision fails before any work
    check_noise(noise)                                              # ... and a bad noise kind
    vae = getattr(denoiser, "vae", None) if decode else None   # the outermost denoiser's (wrappers forward it)
    if vae is not None:
        from ..models.vae import decode_latents
    from tqdm.auto import tqdm

    per_batch = resolve_sampler(sampler, steps, dict(sampler_options or {}),
                                "conditional" if cond else "unconditional")[1]   # the bar's steps
    starts = range(0, n, batch_size)
    was_training = D.training
    D.eval()
    out = []
    try:
        with tqdm(total=len(starts) * per_batch, unit="step", desc="sampling", disable=not progress,
                  leave=False) as bar:
            for k, lo in enumerate(starts):
                hi, end = min(n, lo + batch_size), (k + 1) * per_batch
                gens = [torch.Generator().manual_seed(seed + i) for i in range(lo, hi)]

                def cb(info, lo=lo, hi=hi, end=end):
                    if progress and bar.n < end:
                        bar.update(1)
                    if callback is not None:
                        callback({**info, "batch": (lo, hi)})

                x = sample(D, shape=(hi - lo, *shape), sampler=sampler, steps=steps, generator=gens,
                           sigmas=sigmas, spacing=spacing, cond=slice_cond(cond, lo, hi, n),
                           callback=cb if progress or callback is not None else None,
                           sampler_options=sampler_options, device=device, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
                           precision=precision, noise=noise)
                out.append(x.float().cpu() if vae is None else decode_latents(vae, x))
                if progress:
                    bar.update(max(0, end - bar.n))
                    bar.set_postfix(samples=f"{hi}/{n}")
    finally:
        D.train(was_training)
    return torch.cat(out)
