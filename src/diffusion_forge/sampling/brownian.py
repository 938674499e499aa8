"""Brownian-tree noise: every step count draws its noise from ONE Brownian path per seed.

A stochastic sampler adds std-normal noise z at every step. Drawn fresh per step (:class:`~.utils.Noise`,
what diffusers' schedulers do), the noise of a 10-step run has nothing to do with that of a 500-step run from
the same seed, so the two give unrelated images. Here z is instead the standardised increment of one Brownian
motion B per sample over the step,

    z = (B(rho') - B(rho)) / sqrt(rho' - rho),        rho = 1 / sigma^2  (the signal-to-noise ratio),

which is N(0, I) for every step and independent across the disjoint steps of one grid, so every sampler's
output has exactly the distribution it has with fresh noise; but a fine grid and a coarse one now see the same
path, and as the steps shrink a sampler converges to one sample per seed (the strong solution of the reverse
SDE), not just to one distribution. k-diffusion's ``BrownianTreeNoiseSampler`` (torchsde's BrownianTree, in
sigma time) is the model; this one needs no torchsde.

Why rho = SNR: on a step where D is locally constant, the reverse SDE in tau = sigma^2 is
dx = (x - D) dtau / tau + dW_tau, whose noise reaches sigma' attenuated by tau' / tau: the step's noise is
sigma'^2 (B(1/sigma'^2) - B(1/sigma^2)) with B a Brownian motion in 1/tau, of variance
sigma'^2 (1 - sigma'^2 / sigma^2) = sigma_up^2 of an eta = 1 ancestral step. So in SNR time the standardised
increment is exactly what the ancestral / DPM-Solver++ SDE steps multiply, and sigma = inf is rho = 0, B = 0.

B is a virtual Brownian tree (Li et al. 2020): nodes bisect u = log rho on [log 1e-10, log 1e10]; the root's
two ends are N(0, rho_lo) and B(rho_lo) + N(0, rho_hi - rho_lo), and each midpoint is the Brownian bridge
    B(m) = B(a) + (rho_m - rho_a) / (rho_b - rho_a) (B(b) - B(a)) + sqrt((rho_m - rho_a)(rho_b - rho_m) / (rho_b - rho_a)) z_node,
with z_node drawn from a generator seeded by (the sample's tree seed, the node), so any query, in any order,
sees the same path. Below a width of 2^-DEPTH of the range B is interpolated linearly (a missing variance of
at most a 1e-5 share of the query's rho). Outside [1e-10, 1e10] B is linear towards B(0) = 0 / held.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .utils import Noise

__all__ = ["BrownianNoise", "NOISE_KINDS", "check_noise", "make_noise"]

NOISE_KINDS = ("independent", "brownian")
U_LO, U_HI = math.log(1e-10), math.log(1e10)      # the tree's range in u = log SNR
DEPTH = 22                                         # leaves of width (U_HI - U_LO) / 2^22 ~ 1.1e-5 in log SNR
_MASK = (1 << 63) - 1


def _mix(seed: int, key: int) -> int:
    """A 63-bit seed from (tree seed, node key): splitmix64's finaliser, so nearby keys give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + key * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK


class BrownianNoise(Noise):
    """:class:`~.utils.Noise` whose step noise comes from one Brownian path per sample (see the module).

    ``noise()`` (the prior draw x_T) is the same draw :class:`Noise` makes; the tree seeds are drawn from
    each sample's generator after it, on the first step, so an ODE and an SDE run from one seed start alike."""

    def __init__(self, generators: Sequence[torch.Generator], shape: Sequence[int], device, dtype):
        super().__init__(generators, shape, device, dtype)
        self.seeds: list[int] | None = None
        self.cache: dict[int, torch.Tensor] = {}        # node key -> B there, (batch, *shape) float64; one path

    def _draw(self, key: int) -> torch.Tensor:
        return torch.cat([torch.randn((1, *self.shape), generator=torch.Generator().manual_seed(_mix(s, key)),
                                      dtype=torch.float64) for s in self.seeds])

    def _node(self, key: int, rho_a: float, rho_b: float, rho_m: float, b_a, b_b) -> torch.Tensor:
        if key not in self.cache:                        # B(m) | B(a), B(b): the Brownian bridge
            frac = (rho_m - rho_a) / (rho_b - rho_a)
            std = math.sqrt((rho_m - rho_a) * (rho_b - rho_m) / (rho_b - rho_a))
            self.cache[key] = b_a + frac * (b_b - b_a) + std * self._draw(key)
        return self.cache[key]

    def brownian(self, rho: float) -> torch.Tensor:
        """B(rho) for every sample, (batch, *shape) float64 on the CPU."""
        if self.seeds is None:
            self.seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in self.generators]
        rho_lo, rho_hi = math.exp(U_LO), math.exp(U_HI)
        if 1 not in self.cache:                          # the root's ends: key 1 = B(rho_lo), key 2 = B(rho_hi)
            self.cache[1] = math.sqrt(rho_lo) * self._draw(1)
            self.cache[2] = self.cache[1] + math.sqrt(rho_hi - rho_lo) * self._draw(2)
        if rho <= rho_lo:                                # linear from B(0) = 0
            return self.cache[1] * (rho / rho_lo)
        if rho >= rho_hi:
            return self.cache[2]
        u = math.log(rho)
        a, b, b_a, b_b, key = U_LO, U_HI, self.cache[1], self.cache[2], 1
        path = {1, 2}
        for _ in range(DEPTH):                           # descend: node key = heap index + 2 (past the ends)
            m = 0.5 * (a + b)
            b_m = self._node(key + 2, math.exp(a), math.exp(b), math.exp(m), b_a, b_b)
            path.add(key + 2)
            if u < m:
                b, b_b, key = m, b_m, 2 * key
            else:
                a, b_a, key = m, b_m, 2 * key + 1
        self.cache = {k: v for k, v in self.cache.items() if k in path}   # keep the last path only
        ra, rb = math.exp(a), math.exp(b)
        return b_a + (rho - ra) / (rb - ra) * (b_b - b_a)

    def __call__(self, sigma: float | None = None, sigma_next: float | None = None) -> torch.Tensor:
        """No arguments: the prior draw (as :class:`Noise`). A step sigma -> sigma_next:
        (B(1/sigma_next^2) - B(1/sigma^2)) / sqrt(1/sigma_next^2 - 1/sigma^2): N(0, I), one path per seed."""
        if sigma is None:
            return super().__call__()
        rho = 0.0 if math.isinf(sigma) else sigma ** -2
        rho_next = sigma_next ** -2 if sigma_next > 0 else math.inf
        if not rho_next > rho:
            raise ValueError(f"a Brownian step needs sigma_next < sigma, got {sigma} -> {sigma_next}")
        rho_lo, rho_hi = math.exp(U_LO), math.exp(U_HI)
        if rho_next <= rho_lo or rho >= rho_hi:          # wholly beyond the tree (sigma > 1e5, or < 1e-5 already):
            return super().__call__()                    # a fresh N(0, I)
        rho_next = min(rho_next, rho_hi)                 # a step to sigma = 0 (no sampler adds noise there) ends at rho_hi
        lo, hi = self.brownian(rho), self.brownian(rho_next)
        return ((hi - lo) / math.sqrt(rho_next - rho)).to(self.device, self.dtype)


def check_noise(kind: str) -> str:
    """``kind`` if it is one of NOISE_KINDS, else a ValueError naming them."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise {kind!r}; choose one of: independent (fresh noise at every step, as "
                         "diffusers' schedulers), brownian (one Brownian path per seed: a seed gives nearly the same "
                         "image at every step count, as k-diffusion's BrownianTreeNoiseSampler)")
    return kind


def make_noise(kind: str, generators: Sequence[torch.Generator], shape, device, dtype) -> Noise:
    """The per-sample noise of a sampling run: ``"independent"`` (fresh per step, as diffusers) or
    ``"brownian"`` (one Brownian path per seed, :class:`BrownianNoise`)."""
    cls = BrownianNoise if check_noise(kind) == "brownian" else Noise
    return cls(generators, shape, device, dtype)
