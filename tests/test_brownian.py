"""Brownian-tree noise (sampling/brownian.py): one Brownian path per seed, in SNR time rho = 1 / sigma^2.

Checked against closed forms: every step's noise is N(0, I) and disjoint steps are uncorrelated; a coarse step's
noise is exactly the variance-weighted sum of the fine steps inside it (the path is one path); the samples'
distribution equals that of fresh noise (on Gaussian data, where the exact denoiser is linear, the output std has
a closed form); and, unlike fresh noise, a 10-step ancestral run lands near the 1000-step run from the same seed.
"""
from __future__ import annotations

import math

import pytest
import torch

import diffusion_forge as df
from diffusion_forge.sampling.brownian import BrownianNoise, make_noise
from diffusion_forge.sampling.utils import Noise

torch.set_num_threads(1)
F64 = torch.float64
SD = df.NoiseSchedule.from_name("scaled_linear", 1000, 0.00085, 0.012)
V = 0.3**2                                       # Gaussian data N(0, V I): D(x, sigma) = x V / (V + sigma^2)


def gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def gaussian_eps(x_t, t):
    x_t = x_t.to(F64)
    ab = SD.alpha_bar_at(t.to(F64).clamp(0, 999)).view(-1, *[1] * (x_t.ndim - 1))
    x0 = ab.sqrt() * V / (ab * V + 1 - ab) * x_t
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


GAUSS = df.Denoiser(gaussian_eps, SD, model_dtype=F64)


def rho(s: float) -> float:
    return 0.0 if math.isinf(s) else s**-2


def test_step_noise_is_standard_normal_and_uncorrelated_across_steps():
    noise = BrownianNoise(gens(4000), (4000, 1), "cpu", F64)
    noise()                                                          # the prior draw comes first, as in a sampler
    grid = [math.inf, 80.0, 10.0, 1.0, 0.1, 0.01]
    z = torch.cat([noise(a, b) for a, b in zip(grid[:-1], grid[1:])], 1)
    assert z.mean(0).abs().max() < 0.06                              # 4000 draws: std error of a mean 0.016
    assert (z.std(0) - 1).abs().max() < 0.05
    corr = torch.corrcoef(z.T) - torch.eye(z.shape[1], dtype=F64)
    assert corr.abs().max() < 0.07


def test_a_coarse_step_is_the_sum_of_the_fine_steps_inside_it():
    """One path: B(rho_c) - B(rho_a) = (B(rho_b) - B(rho_a)) + (B(rho_c) - B(rho_b)), whatever the query order."""
    a, b, c = 14.6, 0.7, 0.03
    coarse = BrownianNoise(gens(8), (8, 1, 4, 4), "cpu", F64)
    coarse()
    whole = coarse(a, c)
    fine = BrownianNoise(gens(8), (8, 1, 4, 4), "cpu", F64)
    fine()
    second, first = fine(b, c), fine(a, b)                           # queried out of order
    w1, w2 = math.sqrt(rho(b) - rho(a)), math.sqrt(rho(c) - rho(b))
    combined = (first * w1 + second * w2) / math.sqrt(rho(c) - rho(a))
    assert (combined - whole).abs().max() < 1e-9
    assert (fine(a, b) - first).abs().max() == 0                      # asked again: the same noise


def test_the_prior_draw_is_the_independent_one_and_odes_do_not_change():
    shape = (6, 1, 4, 4)
    assert torch.equal(Noise(gens(6), shape, "cpu", F64)(), BrownianNoise(gens(6), shape, "cpu", F64)())
    a = df.sample(GAUSS, shape=shape, sampler="dpmpp_2m", steps=8, generator=gens(6), dtype=F64)
    b = df.sample(GAUSS, shape=shape, sampler="dpmpp_2m", steps=8, generator=gens(6), dtype=F64, noise="brownian")
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "ddpm"])
def test_the_distribution_of_samples_is_that_of_fresh_noise(sampler):
    """The output std over seeds, Monte Carlo, against the fresh-noise run's: both estimate one closed-form
    std (test_spread.py computes it exactly); 3000 samples, std error about 1.3%."""
    shape = (3000, 1)
    fresh = df.sample(GAUSS, shape=shape, sampler=sampler, steps=10, generator=gens(3000), dtype=F64)
    tree = df.sample(GAUSS, shape=shape, sampler=sampler, steps=10, generator=gens(3000, 10_000), dtype=F64,
                     noise="brownian")
    assert abs(tree.std().item() / fresh.std().item() - 1) < 0.06
    assert abs(tree.mean().item()) < 0.03


def test_few_steps_land_near_the_many_step_sample_of_the_same_seed():
    """Fresh noise: the 10- and 1000-step samples of a seed are unrelated (RMS about sqrt(2) x 0.3). Brownian: the
    distance to the 1000-step sample falls steadily with the steps (measured 0.22, 0.15, 0.08 at 10, 30, 100).
    At 10 trailing steps the floor is the last step, sigma 0.34 -> 0, which adds no noise: it returns the
    posterior mean where the reference draws from the posterior, of std sqrt(V s^2 / (V + s^2)) = 0.22."""
    shape = (200, 1, 2, 2)

    def run(steps, noise):
        return df.sample(GAUSS, shape=shape, sampler="euler_ancestral", steps=steps, generator=gens(200), dtype=F64,
                         noise=noise)
    rms = lambda a, b: (a - b).pow(2).mean().sqrt().item()      # noqa: E731
    ref = run(1000, "brownian")
    near = [rms(run(steps, "brownian"), ref) for steps in (10, 30, 100)]
    far10 = rms(run(10, "independent"), run(1000, "independent"))
    last = float(SD.sigma_grid(10, "default", "trailing")[-2])
    assert far10 > 0.3
    assert abs(near[0] - math.sqrt(V * last**2 / (V + last**2))) < 0.03
    assert near[1] < 0.75 * near[0] and near[2] < 0.6 * near[1]


def test_a_seed_gives_the_same_sample_in_any_batch():
    one = df.sample(GAUSS, shape=(1, 1, 3, 3), sampler="euler_ancestral", steps=6, generator=gens(1, 5), dtype=F64,
                    noise="brownian")
    many = df.sample(GAUSS, shape=(4, 1, 3, 3), sampler="euler_ancestral", steps=6,
                     generator=gens(1, 7) + gens(1, 5) + gens(2, 9), dtype=F64, noise="brownian")
    assert torch.equal(one[0], many[1])


def test_bad_noise_kinds_are_one_clear_error():
    with pytest.raises(ValueError, match="unknown noise 'tree'.*brownian"):
        make_noise("tree", gens(1), (1, 1), "cpu", F64)
    with pytest.raises(ValueError, match="unknown noise"):
        df.sample(GAUSS, shape=(1, 1), steps=2, noise="tree")
    import diffusers
    with pytest.raises(ValueError, match="applies to our samplers"):
        df.sample(GAUSS, shape=(1, 1), steps=2, scheduler=diffusers.DDIMScheduler(), noise="brownian")
    noise = BrownianNoise(gens(1), (1, 1), "cpu", F64)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        noise(1.0, 2.0)
