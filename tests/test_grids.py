"""Optimised sigma grids (sampling/grids.py) and explicit grids in df.sample: shape and determinism of the
grid, the dynamic programme against brute force, accuracy on a Gaussian whose probability-flow ODE is
solved in closed form, and the checks on a grid passed by hand."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import diffusion_forge as df
from diffusion_forge.sampling.grids import gits_path, optimize_sigmas
from diffusion_forge.sampling.registry import SAMPLERS
from diffusion_forge.sampling.utils import Noise

torch.set_num_threads(1)
SCHED = df.NoiseSchedule.from_name("linear", 1000)
M = torch.tensor([0.6, -0.74, 0.0, 0.3], dtype=torch.float64)    # x0 ~ N(M, diag(S^2)): non-zero mean
S = torch.tensor([0.5, 0.1, 0.3, 0.05], dtype=torch.float64)
FAST = {"n": 64, "teacher_steps": 192, "max_evals": 40}            # small enough for a test


def gaussian_net(x_t, t):
    """The exact epsilon prediction for x0 ~ N(M, S^2) under x_t = a x0 + sqrt(1 - a^2) eps:
    E[x0 | x_t] = M + a S^2 / (a^2 S^2 + 1 - a^2) (x_t - a M), in sigma space m + s^2 / (s^2 + sigma^2) (x - m)."""
    ab = SCHED.alpha_bar_at(t.double())[:, None]
    a, x = ab.sqrt(), x_t.double()
    x0 = M + a * S**2 / (ab * S**2 + 1 - ab) * (x - a * M)
    return ((x - a * x0) / (1 - ab).sqrt()).float()


D = df.Denoiser(gaussian_net, SCHED, "epsilon")


def gens(n):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def exact_ode(n):
    """The probability-flow ODE from sample i's prior draw x_T = sqrt(1 + sigma_max^2) z_i, solved in closed
    form: x - m scales with sqrt(s^2 + sigma^2), so x(0) = m + (x_T - m) s / sqrt(s^2 + sigma_max^2)."""
    hi = SCHED.sigma_max
    z = Noise(gens(n), (n, 4), torch.device("cpu"), torch.float64)()   # df.sample's first draw, per sample
    return M + (z * math.sqrt(1 + hi * hi) - M) * S / (S**2 + hi * hi).sqrt()


@pytest.mark.parametrize("sampler, nfe", [("ipndm", 5), ("dpmpp_2m", 4), ("heun", 5), ("unipc", 3)])
def test_grid_is_decreasing_has_the_sampler_length_and_is_deterministic(sampler, nfe):
    grid = optimize_sigmas(D, sampler, nfe, (4,), seed=3, **FAST)
    steps = SAMPLERS[sampler].steps_for(nfe)
    assert grid.dtype == torch.float64 and grid.shape == (steps + 1,)
    assert grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    assert grid[0] == pytest.approx(SCHED.sigma_max) and grid[-2] >= SCHED.sigma_min * (1 - 1e-9)
    assert torch.equal(grid, optimize_sigmas(D, sampler, nfe, (4,), seed=3, **FAST))
    x = df.sample(D, shape=(8, 4), sampler=sampler, steps=steps, sigmas=grid, generator=gens(8))
    assert torch.isfinite(x).all()


def test_dynamic_programme_finds_the_cheapest_path():
    """gits_path against brute force over every K-step path through a handful of candidates (random states)."""
    g = torch.Generator().manual_seed(0)
    c = torch.tensor([80.0, 20.0, 6.0, 2.0, 0.7, 0.2, 0.05], dtype=torch.float64)
    states = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in c]
    x0s = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in c]
    out = torch.randn(5, 3, generator=g, dtype=torch.float64)
    ends, sig = states + [out], c.tolist() + [0.0]

    def cost(i, j):
        jump = x0s[i] + sig[j] / sig[i] * (states[i] - x0s[i])
        return float((jump - ends[j]).norm(dim=1).mean())
    for K in (1, 3, 5):
        paths = [(0, *mid, len(c)) for mid in itertools.combinations(range(1, len(c)), K - 1)]
        best = min(paths, key=lambda p: sum(cost(a, b) for a, b in itertools.pairwise(p)))
        assert gits_path(c, states, x0s, out, K).tolist() == [sig[j] for j in best]


@pytest.mark.parametrize("sampler", ["ipndm", "dpmpp_2m"])
def test_optimised_grid_beats_the_fixed_grids_on_a_gaussian(sampler):
    """At 5 NFE on fresh noise (not the optimiser's batch): the per-sample error against the closed-form ODE
    solution is under half that of every fixed grid, and the sample std is closer to the true S."""
    n, exact = 1000, exact_ode(1000)
    grid = optimize_sigmas(D, sampler, 5, (4,), seed=0, **FAST)
    err = {}
    for name, sigmas in [("optimised", grid), ("default", "default"), ("exponential", "exponential"),
                         ("karras", "karras")]:
        x = df.sample(D, shape=(n, 4), sampler=sampler, steps=5, sigmas=sigmas, generator=gens(n)).double()
        err[name] = (float(((x - exact) ** 2).mean().sqrt()), float((x.std(0) - S).abs().max()))
    for name in ("default", "exponential", "karras"):
        assert err["optimised"][0] < 0.5 * err[name][0], err
        assert err["optimised"][1] < err[name][1], err


def test_sample_takes_an_explicit_grid_as_the_named_one():
    grid = SCHED.sigma_grid(6, "exponential")
    want = df.sample(D, shape=(4, 4), sampler="unipc", steps=6, sigmas="exponential", generator=gens(4))
    for given in (grid, grid.tolist(), grid[:-1], grid[:-1].float().tolist()):
        got = df.sample(D, shape=(4, 4), sampler="unipc", steps=6, sigmas=given, generator=gens(4))
        assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigmas, message", [
    ([1.0, 2.0, 0.0], "strictly decreasing"),
    ([5.0, 5.0, 1.0, 0.0], "strictly decreasing"),
    ([5.0, -1.0, 0.0], "positive"),
    ([5.0, float("nan"), 0.0], "strictly decreasing"),
    ([500.0, 1.0, 0.0], "within the schedule's range"),
    ([5.0, 1e-4, 0.0], "within the schedule's range"),
    ([5.0, 1.0, 0.5, 0.0], "the sampler takes 2 steps"),
    ([[5.0, 1.0, 0.0]], "1-D sequence"),
    ([], "1-D sequence"),
    (3.0, "1-D sequence"),
    ("linear", "unknown sigmas"),
])
def test_bad_sigmas_are_refused(sigmas, message):
    with pytest.raises(ValueError, match=message):
        df.sample(D, shape=(2, 4), sampler="euler", steps=2, sigmas=sigmas)


def test_optimize_sigmas_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="deterministic sampler"):
        optimize_sigmas(D, "euler_ancestral", 5, (4,))
    with pytest.raises(ValueError, match="unknown sampler"):
        optimize_sigmas(D, "nope", 5, (4,))
    with pytest.raises(ValueError, match="nfe must be"):
        optimize_sigmas(D, "heun", 0, (4,))
    with pytest.raises(ValueError, match="shape="):
        optimize_sigmas(D, "ipndm", 5)
    with pytest.raises(ValueError, match="pass sigma_max= and sigma_min="):
        optimize_sigmas(lambda x, s: x, "ipndm", 5, (4,))
