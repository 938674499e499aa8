"""Samplers: parity with diffusers, convergence order, the last step, NFE, per-sample noise, bad input,
robustness at the ends of every schedule, and the default sampler against the benchmark."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import diffusion_forge as df
from diffusion_forge.sampling.generate import generate
from diffusion_forge.sampling import registry
from diffusion_forge.sampling.registry import (DEFAULT_SAMPLERS, ODE_SAMPLERS, SAMPLERS, default_sampler, ode_sampler,
                                              resolve_sampler, steps_for_budget)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers vs numpy 2
SD = df.NoiseSchedule.from_name("scaled_linear", 1000, 0.00085, 0.012)   # Stable Diffusion's; sigma_max 14.6
SMALL = df.NoiseSchedule.from_name("linear", 100, beta_end=0.2)   # 100 steps, still pure noise at the end


class Mixture:
    """Exact E[x0 | x_t] for a 2-component Gaussian mixture in 3-D (a smooth, nonlinear toy 'network')."""
    mu = torch.tensor([[0.5, -0.3, 0.2], [-0.6, 0.4, -0.1]], dtype=torch.float64)
    std = torch.tensor([[0.3, 0.2, 0.4], [0.25, 0.35, 0.15]], dtype=torch.float64)
    logw = torch.tensor([0.6, 0.4], dtype=torch.float64).log()

    def __init__(self, schedule, prediction="epsilon"):
        self.schedule, self.prediction, self.calls = schedule, prediction, 0

    def x0(self, x_t, ab):
        a = ab.sqrt()[:, None, None]
        var = a**2 * self.std**2 + 1 - a**2
        diff = x_t[:, None, :] - a * self.mu
        resp = torch.softmax(self.logw - 0.5 * (diff**2 / var + var.log()).sum(-1), 1)[..., None]
        return (resp * (self.mu + a * self.std**2 / var * diff)).sum(1)

    def __call__(self, x_t, t):
        self.calls += 1
        shape, x_t, ab = x_t.shape, x_t.double().reshape(len(x_t), 3), self.schedule.alpha_bar_at(t.double())
        x0 = self.x0(x_t, ab)
        eps = (x_t - ab.sqrt()[:, None] * x0) / (1 - ab).sqrt()[:, None]
        return df.from_x0_eps(x0, eps, self.prediction, ab).float().reshape(shape)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Parity with diffusers' own scheduler loops (same spacing, same sigmas, same per-sample noise)

PARITY = [
    ("ddim", "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "leading"}, {"spacing": "leading"}),
    ("ddim", "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, {}),
    ("ddpm", "DDPMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, {}),
    ("ddpm", "DDPMScheduler", {"clip_sample": True, "timestep_spacing": "linspace"}, {"spacing": "linspace", "clip_x0": True}),
    ("ddpm", "DDPMScheduler", {"clip_sample": False, "variance_type": "fixed_large", "timestep_spacing": "leading"},
     {"spacing": "leading", "sampler_options": {"variance": "beta"}}),
    ("ddpm", "DDPMScheduler", {"thresholding": True, "sample_max_value": 1.5, "timestep_spacing": "trailing"},
     {"dynamic_threshold": (0.995, 1.5)}),
    # diffusers' sigma-space schedulers start from x = sigma_max z (x_t slightly below unit variance) for
    # "trailing" / "linspace", and from sqrt(1 + sigma_max^2) z (x_t = z, the prior, as we always do) for
    # "leading"; so they are compared on "leading", where both start from the same x_t.
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "leading"}, {"spacing": "leading"}),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "leading"}, {"spacing": "leading"}),
    ("heun", "HeunDiscreteScheduler", {"timestep_spacing": "leading"},
     {"spacing": "leading", "sampler_options": {"euler_start": False}}),
    ("lms", "LMSDiscreteScheduler", {"timestep_spacing": "leading"}, {"spacing": "leading"}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}, {}),
    ("unipc", "UniPCMultistepScheduler", {"timestep_spacing": "trailing"}, {}),
]


@pytest.mark.parametrize("name, cls, config, ours", PARITY, ids=[f"{p[0]}-{p[1]}-{i}" for i, p in enumerate(PARITY)])
def test_parity_with_diffusers(name, cls, config, ours):
    import diffusers
    sched = getattr(diffusers, cls)(**{k: v for k, v in SD.to_diffusers_config().items()
                                       if k != "rescale_betas_zero_snr"}, **config)
    model, shape = Mixture(SD), (6, 3, 1)      # diffusers' thresholding wants (batch, channels, ...)
    theirs = df.sample(model, SD, shape, scheduler=sched, steps=10, generator=gen(7))
    mine = df.sample(model, SD, shape, sampler=name, steps=10, generator=gen(7), **ours)
    assert torch.isfinite(mine).all() and mine.abs().max() > 0.1
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Convergence on the probability-flow ODE of Gaussian data, where the exact solution is known:
# x0 ~ N(mu, s^2) per dimension, D(x, sigma) = mu + (x - mu) s^2 / (s^2 + sigma^2), and the ODE carries x
# from sigma_0 to sigma_1 as x(sigma_1) = mu + (x - mu) sqrt((s^2 + sigma_1^2) / (s^2 + sigma_0^2)).

MU = torch.tensor([0.3, -0.5, 0.1, 0.8], dtype=torch.float64)
S = torch.tensor([0.2, 0.5, 1.0, 0.35], dtype=torch.float64)
CONVERGENCE_STEPS = (64, 128, 256)       # Karras et al.'s grid, sigma 80 -> 0.02, rho = 7 (no final 0)


def gaussian_D(x, sigma):
    return MU + (x - MU) * S**2 / (S**2 + sigma**2)


def karras_grid(n, smax=80.0, smin=0.02, rho=7.0):
    return df.karras_sigmas(n + 1, smin, smax, rho)[:-1].tolist()


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.order is not None])
def test_convergence_order(name):
    spec = SAMPLERS[name]
    options = {**spec.options, **({"eta": 0.0} if "eta" in spec.options else {})}
    x_start = torch.randn(32, 4, generator=gen(0), dtype=torch.float64) * math.sqrt(80.0**2 + 1)
    errors = []
    for n in CONVERGENCE_STEPS:
        grid = karras_grid(n)
        x = spec.fn(gaussian_D, x_start.clone(), grid, None, **options)
        exact = MU + (x_start - MU) * ((S**2 + grid[-1] ** 2) / (S**2 + grid[0] ** 2)).sqrt()
        errors.append((x - exact).abs().max().item())
    slope = -np.polyfit(np.log(CONVERGENCE_STEPS), np.log(errors), 1)[0]
    assert errors[-1] < errors[0]
    assert abs(slope - spec.order) <= 0.3, f"{name}: slope {slope:.2f}, claimed order {spec.order}, errors {errors}"


# ---------------------------------------------------------------------------------------------
# The last step lands on sigma = 0, every sampler x spacing x step count; NFE as documented

class PointMass:
    """All data at c: D(x, sigma) = c for every x, so a sampler ends exactly at c iff its last step
    lands on sigma = 0 (t = 0 'and before': the clean data)."""
    c = torch.tensor([0.25, -0.75])

    def __init__(self, schedule, prediction="epsilon"):
        self.schedule, self.prediction, self.calls = schedule, prediction, 0

    def __call__(self, x_t, t):
        self.calls += 1
        ab = self.schedule.alpha_bar_at(t.double())
        x0 = self.c.double().expand_as(x_t)
        eps = (x_t.double() - ab.sqrt()[:, None] * x0) / (1 - ab).sqrt()[:, None]
        return df.from_x0_eps(x0, eps, self.prediction, ab).float()


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(SAMPLERS)), spacing=st.sampled_from(["leading", "trailing", "linspace"]),
       steps=st.integers(1, 100))
def test_last_step_lands_on_sigma_zero(name, spacing, steps):
    model, seen = PointMass(SMALL), []
    x = df.sample(model, SMALL, (2, 2), sampler=name, steps=steps, spacing=spacing, generator=gen(1),
                  callback=seen.append)
    torch.testing.assert_close(x, PointMass.c.expand(2, 2), atol=1e-4, rtol=0)  # float32 model
    ts = SMALL.timesteps(steps, spacing)
    assert [c["step"] for c in seen] == list(range(steps))
    assert [round(c["t"], 6) for c in seen] == ts.tolist()          # one callback per step, at the grid's t
    assert model.calls == SAMPLERS[name].nfe(steps)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("sigmas", ["karras", "exponential"])
def test_nfe_and_last_step_on_other_grids(name, sigmas):
    for steps in (1, 2, 3, 5, 8):
        model = PointMass(SMALL)
        x = df.sample(model, SMALL, (2, 2), sampler=name, steps=steps, sigmas=sigmas, generator=gen(2))
        torch.testing.assert_close(x, PointMass.c.expand(2, 2), atol=1e-4, rtol=0)  # float32 model
        assert model.calls == SAMPLERS[name].nfe(steps), (name, steps)


def test_nfe_formulas():
    assert [SAMPLERS["heun"].nfe(n) for n in (1, 2, 5)] == [1, 2, 8]
    assert [SAMPLERS["heun"].nfe(n, euler_start=False) for n in (1, 2, 5)] == [1, 3, 9]
    assert [SAMPLERS["pndm"].nfe(n) for n in (1, 2, 3, 5, 10)] == [1, 2, 6, 14, 19]
    assert all(SAMPLERS[n].nfe(7) == 7 for n in ("ddim", "euler", "lms", "dpmpp_2m", "unipc", "deis", "ipndm"))
    assert steps_for_budget("heun", 10) == 6 and steps_for_budget("dpmpp_2m", 10) == 10


# ---------------------------------------------------------------------------------------------
# Per-sample noise: a seed's sample does not depend on the batch

@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2m"])
def test_batch_independence(name):
    model = Mixture(SMALL)
    big = df.sample(model, SMALL, (5, 3), sampler=name, steps=12, generator=[gen(s) for s in (10, 11, 12, 13, 14)])
    small = df.sample(model, SMALL, (2, 3), sampler=name, steps=12, generator=[gen(s) for s in (13, 10)])
    torch.testing.assert_close(small, big[[3, 0]], atol=1e-5, rtol=0)
    # one generator: per-sample seeds drawn from it, so a smaller batch is a prefix of a larger one
    a = df.sample(model, SMALL, (4, 3), sampler=name, steps=12, generator=gen(3))
    b = df.sample(model, SMALL, (2, 3), sampler=name, steps=12, generator=gen(3))
    torch.testing.assert_close(b, a[:2], atol=1e-5, rtol=0)
    assert not torch.allclose(a[0], a[1])


# ---------------------------------------------------------------------------------------------
# Robustness at the ends of every schedule: exact Gaussian-data model, right mean and std

class Gaussian1D:
    mu, s = 0.4, 0.3

    def __init__(self, schedule, prediction):
        self.schedule, self.prediction = schedule, prediction

    def __call__(self, x_t, t):
        x_t, ab = x_t.double(), self.schedule.alpha_bar_at(t.double())[:, None]
        x0 = self.mu + ab.sqrt() * self.s**2 / (ab * self.s**2 + 1 - ab) * (x_t - ab.sqrt() * self.mu)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        if self.prediction == "v_prediction":    # finite at SNR 0: v = -x0 there
            return (ab.sqrt() * eps - (1 - ab).sqrt() * x0).float()
        return eps.float()


SCHEDULES = {
    "cosine": (df.NoiseSchedule.from_name("cosine", 1000), "epsilon"),
    "linear-zero-snr": (df.NoiseSchedule.from_name("linear", 1000, zero_terminal_snr=True), "v_prediction"),
    "scaled-linear-zero-snr": (df.NoiseSchedule.from_name("scaled_linear", 1000, 0.00085, 0.012, True), "v_prediction"),
    "sigmoid": (df.NoiseSchedule.from_name("sigmoid", 1000), "epsilon"),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_every_sampler_is_right_at_both_ends_of_every_schedule(schedule):
    """From pure noise (sigma = inf on zero-terminal-SNR schedules, 2e4 on cosine) to sigma = 0, on grids
    that start at the last training step and end at the first ("linspace") or near it ("trailing"), with
    50 network evaluations: finite, right mean, std within discretisation error (ancestral samplers
    converge slowest)."""
    sched, prediction = SCHEDULES[schedule]
    model = Gaussian1D(sched, prediction)
    for name, spec in SAMPLERS.items():
        for spacing in ("trailing", "linspace"):
            x = df.sample(model, sched, (300, 1), sampler=name, steps=spec.steps_for(50), spacing=spacing,
                          prediction=prediction, generator=gen(5)).double()
            tol = 0.07 if spec.stochastic else 0.06
            assert torch.isfinite(x).all(), (name, spacing)
            assert abs(x.mean() - model.mu) < 0.04 and abs(x.std() - model.s) < tol, \
                (name, spacing, x.mean().item(), x.std().item())


def test_zero_terminal_snr_starts_from_pure_noise_at_sigma_inf():
    sched, seen = SCHEDULES["linear-zero-snr"][0], []
    model = Gaussian1D(sched, "v_prediction")
    x = df.sample(model, sched, (4000, 1), sampler="dpmpp_2m", steps=50, prediction="v_prediction",
                  generator=gen(0), callback=seen.append).double()
    assert math.isinf(seen[0]["sigma"]) and seen[0]["t"] == 999
    torch.testing.assert_close(seen[0]["x0"], torch.full_like(seen[0]["x0"], model.mu))   # E[x0] at SNR 0
    assert abs(x.mean() - 0.4) < 0.02 and abs(x.std() - 0.3) < 0.02
    with pytest.raises(ValueError, match="v_prediction"):   # an epsilon model cannot start at SNR 0
        df.sample(Gaussian1D(sched, "epsilon"), sched, (2, 1), sampler="euler", steps=5)


# ---------------------------------------------------------------------------------------------
# Options and bad input

def test_callback_sees_x_t_t_and_x0():
    seen = []
    df.sample(Mixture(SMALL), SMALL, (3, 3), sampler="heun", steps=4, callback=seen.append)
    assert len(seen) == 4 and seen[0]["t"] == 99 and seen[-1]["t"] < seen[0]["t"]
    assert all(c["x_t"].shape == (3, 3) and c["x0"].shape == (3, 3) for c in seen)
    assert seen[0]["x_t"].std() > 0.5                  # x_t, the model's input, is unit-variance noise at first


def test_clipping_and_dynamic_threshold_bound_x0():
    model, seen = Mixture(SMALL), []
    df.sample(model, SMALL, (8, 3), sampler="euler", steps=6, clip_x0=0.2, callback=seen.append)
    assert all(c["x0"].abs().max() <= 0.2 + 1e-6 for c in seen)
    seen.clear()
    df.sample(model, SMALL, (8, 3), sampler="euler", steps=6, dynamic_threshold=0.5, callback=seen.append)
    assert all(c["x0"].abs().max() <= 1 + 1e-6 for c in seen)


def test_default_sampler_fits_the_budget_and_reads_the_table():
    for budget in (1, 3, 5, 7, 10, 19, 20, 49, 50, 200):
        name, options = default_sampler(budget)
        assert (name, options) == DEFAULT_SAMPLERS[max(k for k in DEFAULT_SAMPLERS if k <= budget)]
        assert ode_sampler(budget) == ODE_SAMPLERS[max(k for k in ODE_SAMPLERS if k <= budget)]
        assert resolve_sampler(None, budget)[0] == name
        assert resolve_sampler(None, budget)[2] == {**SAMPLERS[name].options, **options}
        model = PointMass(SMALL)
        df.sample(model, SMALL, (1, 2), steps=budget if budget <= 100 else 100, generator=gen(0))
        assert 1 <= model.calls <= budget


def test_samples_with_a_condition_get_the_conditional_default():
    """sampler=None with a cond (class labels, a prompt) takes CONDITIONAL_SAMPLERS, without one DEFAULT_SAMPLERS;
    df.sample reads it from the cond it is given, bit for bit as if the sampler had been named."""
    assert default_sampler(20, "conditional") == registry.CONDITIONAL_SAMPLERS[1]
    assert default_sampler(20) == DEFAULT_SAMPLERS[1] != registry.CONDITIONAL_SAMPLERS[1]
    # classes drawn like the data and sampled unguided: their own table, by budget (s_tmax 3, then 5 from 250 NFE)
    assert default_sampler(20, "data") == ("dpmpp_2m_sde", {"eta": 5.0, "s_tmax": 3.0})
    assert default_sampler(250, "data") == ("dpmpp_2m_sde", {"eta": 5.0, "s_tmax": 5.0})
    assert resolve_sampler(None, 10, None, "data") == ("dpmpp_2m_sde", SAMPLERS["dpmpp_2m_sde"].steps_for(10),
                                                       {**SAMPLERS["dpmpp_2m_sde"].options, "eta": 5.0, "s_tmax": 3.0})
    with pytest.raises(ValueError, match="samples must be one of unconditional, conditional, data, got 'cond'"):
        default_sampler(10, "cond")

    class Labelled(torch.nn.Module):      # a network that takes class labels and ignores them
        def __init__(self):
            super().__init__()
            self.inner = Mixture(SMALL)

        def forward(self, x_t, t, class_labels=None):
            return self.inner(x_t, t)
    model, labels = Labelled(), {"class_labels": torch.zeros(4, dtype=torch.long)}
    for cond, conditional in ((labels, True), (None, False)):
        name, options = default_sampler(10, "conditional" if conditional else "unconditional")
        auto = df.sample(model, SMALL, (4, 3), steps=10, generator=[gen(i) for i in range(4)], cond=cond)
        named = df.sample(model, SMALL, (4, 3), sampler=name, steps=10, sampler_options=options,
                          generator=[gen(i) for i in range(4)], cond=cond)
        other = df.sample(model, SMALL, (4, 3), sampler=name, steps=10, generator=[gen(i) for i in range(4)],
                          sampler_options=default_sampler(10, "unconditional" if conditional else "conditional")[1],
                          cond=cond)
        assert torch.equal(auto, named) and not torch.allclose(auto, other)


def test_options_given_with_no_sampler_override_the_defaults_options():
    name, options = default_sampler(20)
    key, default = next((k, v) for k, v in SAMPLERS[name].options.items() if isinstance(v, float))
    value = options.get(key, default) / 2
    assert resolve_sampler(None, 20, {key: value})[2][key] == value
    assert default_sampler(20) == (name, options)   # the table itself is not changed by a call


@pytest.mark.parametrize("kwargs, match", [
    ({"sampler": "dpm++"}, "choose one of: ddpm, ddim, euler"),
    ({"sampler": "euler", "steps": 0}, "steps must be an integer >= 1"),
    ({"sampler": "euler", "steps": 2.5}, "steps must be an integer >= 1"),
    ({"sampler": "euler", "steps": 101}, "use at most 100 steps"),
    ({"sampler": "euler", "sigmas": "polyexponential"}, "choose one of: default, karras, exponential"),
    ({"sampler": "euler", "spacing": "uniform"}, "choose one of: leading, trailing, linspace"),
    ({"sampler": "euler", "prediction": "eps"}, "choose one of: epsilon, sample, v_prediction"),
    ({"sampler": "euler", "eta": 0.5}, "takes no option 'eta'"),
    ({"sampler": "ddpm", "sampler_options": {"variance": "learned"}}, "choose one of: beta_tilde, beta"),
    ({"sampler": "euler", "generator": [torch.Generator()]}, "one per sample"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        df.sample(PointMass(SMALL), SMALL, (2, 2), **kwargs)


def test_karras_grid_may_take_more_steps_than_training_timesteps():
    model = PointMass(SMALL)
    x = df.sample(model, SMALL, (2, 2), sampler="dpmpp_2m", steps=150, sigmas="karras")
    torch.testing.assert_close(x, PointMass.c.expand(2, 2), atol=1e-4, rtol=0)  # float32 model


# ---------------------------------------------------------------------------------------------
# The default sampler per budget is the benchmark's winner

def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "samplers.py"
    spec = importlib.util.spec_from_file_location("bench_samplers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ode_sampler_is_the_benchmarks_winner():
    """The benchmark's measurement of our samplers on the default grid, at its own sample size and seeds for
    the deterministic samplers (so the numbers are the benchmark's); the stochastic ones, which never win
    there, are checked at a smaller size to stay behind the winner."""
    bench = _benchmark()
    deterministic = [bench.ours(n) for n, s in SAMPLERS.items() if not s.stochastic]
    table, _ = bench.measure(deterministic, bench.BUDGETS, bench.N_SAMPLES)
    won = bench.winners(table)
    assert {b: w.removeprefix("ours ") for b, w in won.items()} == {b: ode_sampler(b) for b in bench.BUDGETS}
    stochastic = [bench.ours(n) for n, s in SAMPLERS.items() if s.stochastic]
    rough, _ = bench.measure(stochastic, bench.BUDGETS, 1000)
    for b in bench.BUDGETS:
        assert all(row[b][1] > table[won[b]][b][1] for row in rough.values()), b


# ---------------------------------------------------------------------------------------------
# iPNDM's free ends: the analytical first step and the last step without an evaluation

FREE = {"afs": True, "free_last_step": True}


@pytest.mark.parametrize("sigmas", ["exponential", "karras", "default"])
def test_ipndm_free_ends_save_two_evaluations(sigmas):
    spec = SAMPLERS["ipndm"]
    assert [spec.nfe(n, **FREE) for n in (1, 2, 3, 7)] == [1, 0, 1, 5]
    assert spec.steps_for(5, **FREE) == 7 and spec.nfe(7, afs=True) == 6
    for steps in (1, 3, 5, 8):
        model, seen = PointMass(SMALL), []
        df.sample(model, SMALL, (2, 2), sampler="ipndm", steps=steps, sigmas=sigmas, sampler_options=FREE,
                  generator=gen(2), callback=seen.append)
        assert model.calls == spec.nfe(steps, **FREE) and len(seen) == steps


def test_ipndm_free_ends_are_exact_where_their_assumptions_hold():
    """The analytical first step assumes x_T is noise independent of zero-mean data; the free last step
    reuses the newest slope, which is exact when the slope is constant. Both hold for a point mass at 0."""
    class Zero(PointMass):
        c = torch.zeros(2)
    x = df.sample(Zero(SMALL), SMALL, (3, 2), sampler="ipndm", steps=7, sigmas="exponential",
                  sampler_options=FREE, generator=gen(4))
    torch.testing.assert_close(x, torch.zeros(3, 2), atol=1e-4, rtol=0)
    # zero-terminal SNR: the closed-form start from SNR 0 takes the first step (with its evaluation)
    sched = SCHEDULES["linear-zero-snr"][0]
    model = Gaussian1D(sched, "v_prediction")
    calls = []
    wrapped = lambda x_t, t: (calls.append(1), model(x_t, t))[1]  # noqa: E731
    x = df.sample(wrapped, sched, (2000, 1), sampler="ipndm", steps=20, prediction="v_prediction",
                  spacing="linspace", sampler_options=FREE, generator=gen(0)).double()
    assert len(calls) == SAMPLERS["ipndm"].nfe(20, afs=False, free_last_step=True) == 19
    assert abs(x.mean() - model.mu) < 0.03 and abs(x.std() - model.s) < 0.03


# ---------------------------------------------------------------------------------------------
# The one rule that picks a sampler, and the one seeded, batched generation loop

def test_resolve_sampler_is_the_one_rule(monkeypatch):
    name, options = default_sampler(10)
    assert resolve_sampler(None, 10, None) == (name, SAMPLERS[name].steps_for(10, **options),
                                               {**SAMPLERS[name].options, **options})
    monkeypatch.setattr(registry, "DEFAULT_SAMPLERS", {1: ("ipndm", {})})   # the rule, on a one-entry table
    assert resolve_sampler(None, 10, None) == ("ipndm", 10, {"afs": False, "free_last_step": False})
    assert resolve_sampler(None, 12, {"afs": True}) == ("ipndm", 13, {"afs": True, "free_last_step": False})
    assert resolve_sampler("heun", 5, {"euler_start": False, "s_noise": None}) == ("heun", 5, {"euler_start": False})
    assert resolve_sampler("euler_ancestral", 3, {"eta": 1.8})[2] == {"eta": 1.8, "s_noise": 1.0, "s_tmax": math.inf}
    with pytest.raises(ValueError, match="sampler 'dpmpp_2m' takes no option 'eta'; its options: none"):
        resolve_sampler("dpmpp_2m", 5, {"eta": 1.0})
    with pytest.raises(ValueError, match=r"no option 'order'; its options: afs \(default False\), free_last_step"):
        resolve_sampler(None, 10, {"order": 3})
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"option order=2.5 of 'lms' must be an int \(default 4\)"):
        resolve_sampler("lms", 10, {"order": 2.5})
    with pytest.raises(ValueError, match="option eta='1' of 'ddim' must be a float"):
        df.sample(PointMass(SMALL), SMALL, (2, 2), sampler="ddim", steps=3, eta="1")
    assert resolve_sampler("ddim", 3, {"eta": 1})[2]["eta"] == 1
    with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+'; choose one of: ddpm, ddim, euler"):
        resolve_sampler("dpm++", 5, None)


def test_generate_seeds_sample_i_with_seed_plus_i_whatever_the_batch():
    model = Mixture(SMALL)
    D = df.Denoiser(model, SMALL, sample_shape=(3,))
    kw = dict(sampler="euler_ancestral", steps=6, sampler_options={"eta": 1.5})
    a = generate(D, 5, seed=7, batch_size=5, **kw)
    b = generate(D, 5, seed=7, batch_size=2, **kw)
    c = generate(D, 2, seed=10, batch_size=1, **kw)
    assert a.dtype == torch.float32 and a.device.type == "cpu" and a.shape == (5, 3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, a[3:], atol=1e-5, rtol=0)
    one = df.sample(model, SMALL, (1, 3), generator=[gen(9)], **kw)
    torch.testing.assert_close(a[2:3], one, atol=1e-5, rtol=0)
    # the default sampler by budget, as df.sample picks it
    torch.testing.assert_close(generate(D, 2, seed=3, steps=10), df.sample(D, shape=(2, 3), steps=10,
                                                                         generator=[gen(3), gen(4)]))


def test_generate_slices_cond_per_batch_and_shows_progress(capsys):
    seen = []

    def net(x_t, t, class_labels):
        seen.append(class_labels.tolist())
        return 0.1 * x_t + 0.01 * class_labels[:, None]
    D = df.Denoiser(net, SMALL)
    D.train()
    x = generate(D, 5, sampler="euler", steps=2, cond={"class_labels": torch.arange(5)}, batch_size=2,
                 sample_shape=(2,), progress=True)
    assert x.shape == (5, 2) and seen == [[0, 1], [0, 1], [2, 3], [2, 3], [4], [4]] and D.training
    assert "sampling:" in capsys.readouterr().err           # a tqdm bar over the 5 samples
    generate(D, 1, sampler="euler", steps=2, cond={"class_labels": torch.arange(1)}, sample_shape=(2,))
    assert capsys.readouterr().err == ""                       # no bar unless asked
    with pytest.raises(ValueError, match=r"cond\['class_labels'\] must hold one value per sample \(length 5\)"):
        generate(D, 5, sampler="euler", steps=2, cond={"class_labels": torch.arange(4)}, sample_shape=(2,))
    with pytest.raises(ValueError, match="pass sample_shape="):
        generate(D, 5, sampler="euler", steps=2)
