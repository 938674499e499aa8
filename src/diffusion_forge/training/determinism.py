"""Determinism: every random draw of step k comes from generators seeded by (seed, k, purpose).

Nothing is drawn from a stream that runs through the whole run, so step k's batch, timesteps, noise,
flips, condition dropout and dropout masks are found directly from (seed, k): a run killed at any
moment resumes bit for bit, and every process draws the same global batch and takes its share.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

# purposes: the third entry of a generator's key
DATA_ORDER, STEP_NOISE, OVERFIT, GLOBAL_RNG, COND_DROPOUT = 1, 2, 3, 4, 5


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (mixed by NumPy's SeedSequence)."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=2)
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=seeded_generator(seed, epoch, DATA_ORDER))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The dataset indices of the global batch of ``step``: consecutive slices of a fresh random
    permutation per epoch, so each epoch sees every item once and any step is found directly."""
    start = step * batch_size
    out, pos = [], start
    while pos < start + batch_size:
        epoch, offset = divmod(pos, n)
        perm = epoch_permutation(n, seed, epoch)
        take = min(n - offset, start + batch_size - pos)
        out.append(perm[offset: offset + take])
        pos += take
    return torch.cat(out)


def step_noise(step: int, batch_size: int, sample_shape, num_timesteps: int, seed: int, flip: bool,
               draw_t=None):
    """t ~ U{0..T-1} (float64), eps ~ N(0, I) (float32) and a flip mask (p = 1/2) for the global batch of
    ``step``, drawn on the CPU in this order from one generator. ``draw_t(batch, generator)`` replaces the
    uniform t (e.g. ``core.losses.sample_timesteps`` with log-normal noise levels)."""
    g = seeded_generator(seed, step, STEP_NOISE)
    if draw_t is None:
        t = torch.randint(0, num_timesteps, (batch_size,), generator=g).to(torch.float64)
    else:
        t = draw_t(batch_size, g)
    noise = torch.randn((batch_size, *sample_shape), generator=g)
    flips = torch.rand(batch_size, generator=g) < 0.5 if flip else None
    return t, noise, flips


def dropout_mask(step: int, batch_size: int, p: float, seed: int) -> torch.Tensor | None:
    """Which samples of the global batch of ``step`` get the null condition: u_i < p, u_i ~ U[0, 1)
    (so a fraction p on average); None when p = 0 (nothing drawn)."""
    if p <= 0:
        return None
    return torch.rand(batch_size, generator=seeded_generator(seed, step, COND_DROPOUT)) < p


def seed_global_rng(seed: int, step: int, rank: int) -> None:
    """Anything inside the model that draws from the global RNG (dropout) gets a stream fixed by
    (seed, step, process): resumable, and independent across processes."""
    torch.manual_seed(int(seeded_generator(seed, step, rank, GLOBAL_RNG).initial_seed()))
