"""Likelihood: the negative log-likelihood bound in bits/dim, with a 95% interval."""
from __future__ import annotations

import math
import sys

import numpy as np
import torch


def _t_quantile_975(dof: int) -> float:
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, dof)) if dof > 0 else float("inf")


def nll_bits_per_dim(model, x0: torch.Tensor, schedule=None, prediction: str | None = None, num_t: int = 32,
                     draws: int = 1, batch: int = 64, generator: torch.Generator | None = None,
                     progress: str | None = None, cond: dict | None = None, **cond_kwargs) -> dict:
    """Negative log-likelihood bound in bits/dim on held-out data x0 (float N x ... in [-1, 1], 8-bit).

    ``model``: a Denoiser or a loaded run (its network, schedule and prediction are used), or a network
    ``model(x_t, t, **cond)`` with its ``schedule`` and ``prediction`` (default "epsilon").
    ``cond`` (or keyword arguments): per-sample conditioning, tensors with one row per image.

    Each image's bound (prior + T KL terms + decoder) is estimated without bias by stratified Monte Carlo
    over t (``losses.variational_bound_mc``, ``num_t`` network calls per draw), averaged over ``draws``;
    bits/dim = nats / (dims ln 2). The 95% interval is mean +- t_{0.975, N-1} * sd / sqrt(N) over the
    per-image estimates, so it holds both the image-to-image spread and the Monte Carlo noise. Returns
    {"bpd", "ci95" (half-width), "low", "high", "n", "num_t", "draws", "per_image"}."""
    from ..core.losses import bits_per_dim, variational_bound_mc
    from ..denoise.denoiser import DenoiserBase, as_denoiser
    from ..sampling.generate import slice_cond

    if schedule is None or isinstance(model, DenoiserBase):   # the bound needs the network's own output
        D = as_denoiser(model, schedule, prediction)
        model, schedule, prediction = D.network, D.schedule, D.prediction
    prediction = prediction or "epsilon"
    cond = {**(cond or {}), **cond_kwargs}
    x0 = torch.as_tensor(x0)
    dims = int(np.prod(x0.shape[1:]))
    per = []
    steps = range(0, len(x0), batch)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=progress, unit="batch", leave=False, file=sys.stderr)
    for lo in steps:
        xb = x0[lo:lo + batch]
        c = slice_cond(cond, lo, min(lo + batch, len(x0)), len(x0))
        est = torch.stack([variational_bound_mc(model, xb, schedule, prediction, num_t=num_t, generator=generator, **c)
                           for _ in range(draws)]).mean(0)
        per.append(bits_per_dim(est, dims).double().cpu())
    per = torch.cat(per)
    n = len(per)
    mean = float(per.mean())
    half = _t_quantile_975(n - 1) * float(per.std()) / math.sqrt(n) if n > 1 else float("inf")
    return {"bpd": mean, "ci95": half, "low": mean - half, "high": mean + half, "n": n, "num_t": num_t,
            "draws": draws, "per_image": per}
