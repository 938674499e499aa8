"""One-batch overfit: does the pipeline learn at all?

Train the configured network on ONE fixed batch with fixed t and noise (no warm-up, no EMA). A working
model, data pipeline and loss memorise it: the loss L_k must fall below OVERFIT_RATIO x L_0, with L_0 and
L_k the means of the first and last min(10, steps / 10) losses.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..core.losses import diffusion_loss
from .build import TrainingData, build_network, build_schedule
from .config import Config
from .determinism import OVERFIT, seeded_generator
from .precision import make_optimizer

OVERFIT_RATIO = 0.1  # pass when the final loss is below this fraction of the initial loss


def _fixed_batch(cfg: Config, data: TrainingData, batch_size: int):
    """(x0, cond, t, noise) drawn once from the generator of (seed, 0, OVERFIT)."""
    g = seeded_generator(cfg.run.seed, 0, OVERFIT)
    x0, cond = data.batch(torch.randperm(data.n, generator=g)[:batch_size])
    t = torch.randint(0, cfg.diffusion.num_timesteps, (batch_size,), generator=g).to(torch.float64)
    noise = torch.randn(x0.shape, generator=g)
    return x0, cond, t, noise


def _verdict(cfg: Config, initial: float, final: float, threshold: float, steps: int, lo: float, hi: float,
             passed: bool) -> str:
    if passed:
        verdict = (f"PASS: the loss on one fixed batch fell from {initial:.4f} to {final:.4f}, below the threshold "
                   f"{threshold:.4f} ({OVERFIT_RATIO:g} x initial) in {steps} steps: the model, data and loss "
                   "can learn. If samples are still noise: train longer, and sample with the same prediction and "
                   "schedule the model was trained with.")
    else:
        verdict = (f"FAIL: the loss on one fixed batch went from {initial:.4f} to {final:.4f}, not below "
                   f"{threshold:.4f} ({OVERFIT_RATIO:g} x initial) in {steps} steps. Check the learning rate "
                   f"(optim.lr={cfg.optim.lr}), the model size, and the data range.")
    if lo < -1.01 or hi > 1.01 or lo >= -0.01:
        verdict += (f" WARNING: the data lies in [{lo:.3g}, {hi:.3g}]; diffusion models expect images scaled to "
                    "[-1, 1] (x / 127.5 - 1).")
    return verdict


def overfit_batch(cfg: Config, steps: int = 300, batch_size: int = 16, progress: bool = True) -> dict:
    """Train on one fixed batch for ``steps`` steps at the constant optim.lr and report whether the loss
    fell below OVERFIT_RATIO x its initial value.

    Returns {"passed", "initial", "final", "threshold", "verdict", "losses", "data_range"}."""
    from ..denoise.denoiser import Denoiser

    torch.manual_seed(cfg.run.seed)
    schedule = build_schedule(cfg)
    data = TrainingData(cfg)
    batch_size = min(batch_size, data.n)
    x0, cond, t, noise = _fixed_batch(cfg, data, batch_size)
    model, _ = build_network(cfg, data.sample_shape, schedule, data.num_classes, text_encoder=data.text_encoder)
    D = Denoiser(model, schedule, cfg.diffusion.prediction)
    opt = make_optimizer(model, cfg)
    for group in opt.param_groups:
        group["lr"] = cfg.optim.lr
    losses = []
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, unit="step", desc="overfit one batch")
    for _ in iterator:
        loss = diffusion_loss(D, x0, min_snr_gamma=cfg.diffusion.min_snr_gamma, t=t, noise=noise, cond=cond)
        if not torch.isfinite(loss):
            losses.append(float("nan"))
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        losses.append(loss.item())
        if progress:
            iterator.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    k = max(1, min(10, len(losses) // 10))
    initial, final = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    threshold = OVERFIT_RATIO * initial
    lo, hi = float(x0.min()), float(x0.max())
    passed = math.isfinite(final) and final < threshold
    return {"passed": passed, "initial": initial, "final": final, "threshold": threshold,
            "verdict": _verdict(cfg, initial, final, threshold, len(losses), lo, hi, passed),
            "losses": losses, "data_range": [lo, hi]}
