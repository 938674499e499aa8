"""Exact denoisers for data whose E[x_0 | x_t] has a closed form (shared by several test files)."""
from __future__ import annotations

import math

import torch

from diffusion_forge.core.schedules import NoiseSchedule

LEVELS = torch.linspace(-1, 1, 256, dtype=torch.float64)  # 8-bit data scaled to [-1, 1]


class QuantisedGaussian:
    """Each dimension independently takes one of the 256 levels of [-1, 1], with probability equal to
    the N(mean, std^2) mass of that level's bin (the edge bins extend to infinity)."""

    def __init__(self, mean: float = 0.1, std: float = 0.3):
        edges = torch.cat([torch.tensor([-math.inf]), (LEVELS[1:] + LEVELS[:-1]) / 2, torch.tensor([math.inf])])
        cdf = torch.special.ndtr((edges - mean) / std)
        probs = cdf[1:] - cdf[:-1]
        keep = probs > 1e-15  # levels that can occur at all (the rest would cost time, not accuracy)
        self.levels, self.probs = LEVELS[keep], probs[keep] / probs[keep].sum()
        self.log_probs = self.probs.log()

    def entropy_bits(self) -> float:
        """The true NLL per dimension, in bits: -sum p log2 p."""
        return float(-(self.probs * self.log_probs).sum() / math.log(2))

    def sample(self, shape, generator) -> torch.Tensor:
        idx = torch.multinomial(self.probs, math.prod(shape), replacement=True, generator=generator)
        return self.levels[idx].reshape(shape)

    def denoiser(self, schedule: NoiseSchedule, prediction: str = "sample"):
        """model(x_t, t) returning the exact E[x_0 | x_t] (as x_0, or converted to eps)."""
        from diffusion_forge.core.process import from_x0_eps

        def model(x_t, t):
            ab = schedule.alpha_bar_at(t.double()).reshape(-1, *[1] * (x_t.ndim - 1))
            x = x_t.double().unsqueeze(-1)
            # posterior over levels: p_k N(x_t; sqrt(ab) v_k, 1 - ab)
            v = self.levels
            logits = self.log_probs - (x - ab.sqrt().unsqueeze(-1) * v) ** 2 / (2 * (1 - ab).unsqueeze(-1))
            x0 = (logits.softmax(-1) * v).sum(-1)
            eps = (x_t.double() - ab.sqrt() * x0) / (1 - ab).sqrt()
            return from_x0_eps(x0, eps, prediction, ab.flatten()).to(x_t.dtype)

        return model
