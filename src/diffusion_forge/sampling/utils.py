"""Shared bookkeeping for the samplers: per-sample noise, the start from pure noise, multistep weights.

Samplers work in "sigma space" (Karras et al. 2022): the state is

    x = x_t / sqrt(alpha_bar) = x_0 + sigma * eps,        alpha_bar = 1 / (1 + sigma^2),

and the network is seen through a denoiser D(x, sigma) ~ E[x_0 | x]: :class:`diffusion_forge.Denoiser`
(``denoise/denoiser.py``), the single place that maps sigma to (x_t, t) and a prediction to x_0.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

F64 = torch.float64


def work_dtype(device: torch.device) -> torch.dtype:
    """Samplers integrate in float64, except on Apple MPS, which has none."""
    return torch.float32 if device.type == "mps" else F64


# ---------------------------------------------------------------------------------------------
# Per-sample noise

def per_sample_generators(generator, batch: int) -> list[torch.Generator]:
    """One CPU generator per sample. A list is used as given; a single generator (or None: torch's global
    RNG) draws one seed per sample, so sample i of a batch of n equals sample i of a larger batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}; pass one per sample")
        return list(generator)
    seeds = torch.randint(0, 2**62, (batch,), generator=generator)
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class Noise:
    """Standard normal noise of the sample shape, drawn per sample on the CPU from that sample's own
    generator (float32, as diffusers' ``randn_tensor`` does), so it does not depend on the batch."""

    def __init__(self, generators: Sequence[torch.Generator], shape: Sequence[int], device, dtype):
        self.generators, self.shape, self.device, self.dtype = generators, tuple(shape[1:]), device, dtype

    def __call__(self, sigma: float | None = None, sigma_next: float | None = None) -> torch.Tensor:
        """N(0, I) of the batch's shape: the prior draw (no arguments) or the noise a stochastic sampler adds on
        its step sigma -> sigma_next (k-diffusion's ``noise_sampler(sigma, sigma_next)``); here both are fresh
        draws, :class:`~diffusion_forge.sampling.brownian.BrownianNoise` takes the step's from one Brownian path."""
        z = torch.cat([torch.randn((1, *self.shape), generator=g, dtype=torch.float32) for g in self.generators])
        return z.to(self.device, self.dtype)


# ---------------------------------------------------------------------------------------------
# The start from pure noise

def start(D: Callable, noise: Noise, sigmas: torch.Tensor, up_fraction: float,
          callback: Callable | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial state and the sigma grid left to integrate.

    With a finite sigma_0 the prior is x = sqrt(1 + sigma_0^2) z, i.e. x_t = z ~ N(0, I), the model's own
    prior. When sigma_0 = inf (zero-terminal SNR) no sigma-space state exists, so the first step is taken
    in closed form from SNR 0, where eps = x_t exactly: x_1 = x0_hat + sqrt(sigma_1^2 - up^2) x_t + up z',
    with up = up_fraction * sigma_1 (0 for ODE samplers, the ancestral share of new noise otherwise). This
    is the DDIM / DDPM posterior step from alpha_bar = 0, and costs one network evaluation: D(z, inf), where
    the denoiser takes x as x_t itself.
    """
    z = noise()
    s0 = float(sigmas[0])
    if math.isfinite(s0):
        return z * math.sqrt(1.0 + s0 * s0), sigmas
    x0 = D(z, math.inf)
    if callback is not None:
        callback(0, z, math.inf, x0)  # at sigma = inf the state passed is x_t itself
    s1 = float(sigmas[1])
    up = up_fraction * s1
    x = x0 + math.sqrt(s1 * s1 - up * up) * z
    if up > 0:
        x = x + up * noise(math.inf, s1)
    return x, sigmas[1:]


# ---------------------------------------------------------------------------------------------
# Polynomial (Adams-Bashforth) weights for the multistep samplers

def lagrange_weights(nodes: Sequence[float], a: float, b: float, exp_weight: bool = False) -> list[float]:
    """w_j = int_a^b l_j(u) du for the Lagrange basis l_j on ``nodes`` (or int_a^b l_j(u) e^u du with
    ``exp_weight``), in closed form: the antiderivative of p(u) e^u is e^u (p - p' + p'' - ...), which lets
    b be -inf (the last step to sigma = 0 when u = log sigma)."""
    from numpy.polynomial import Polynomial as P

    weights = []
    for j, nj in enumerate(nodes):
        l = P([1.0])
        for k, nk in enumerate(nodes):
            if k != j:
                l = l * P([-nk, 1.0]) / (nj - nk)
        if not exp_weight:
            F = l.integ()
            weights.append(float(F(b) - F(a)))
            continue
        G = sum(((-1) ** k * l.deriv(k) for k in range(l.degree() + 1)), P([0.0]))
        at = lambda u: 0.0 if u == -math.inf else math.exp(u) * float(G(u))  # noqa: E731
        weights.append(at(b) - at(a))
    return weights
