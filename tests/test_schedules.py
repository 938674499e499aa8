"""NoiseSchedule against diffusers' own classes and against closed forms."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

import diffusion_forge as df
from diffusion_forge.core.schedules import SCHEDULE_NAMES, karras_sigmas, spaced_timesteps

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "sigmoid": "sigmoid"}


def close(ours, theirs):
    np.testing.assert_allclose(ours.numpy(), theirs.double().numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("T", [1000, 50])
def test_named_schedules_equal_diffusers_defaults(name, T):
    ours = df.NoiseSchedule.from_name(name, num_timesteps=T)
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name])
    close(ours.betas, theirs.betas)
    close(ours.alphas_cumprod, theirs.alphas_cumprod)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "sigmoid"])
def test_explicit_betas_equal_diffusers(name):
    ours = df.NoiseSchedule.from_name(name, 1000, beta_start=0.00085, beta_end=0.012)
    theirs = DDPMScheduler(beta_schedule=name, beta_start=0.00085, beta_end=0.012)
    close(ours.alphas_cumprod, theirs.alphas_cumprod)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_zero_terminal_snr_equals_diffusers_rescale(name):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

    plain = df.NoiseSchedule.from_name(name, 1000)
    ours = df.NoiseSchedule.from_name(name, 1000, zero_terminal_snr=True)
    # diffusers' own function, run in float64 on the same betas: equal to rounding
    torch.testing.assert_close(ours.betas, diffusers_rescale(plain.betas.clone()), rtol=1e-12, atol=1e-15)
    # the scheduler computes in float32, where 1 - alpha cancels for small betas: compare alpha_bar
    theirs = DDPMScheduler(beta_schedule=DIFFUSERS_NAME[name], rescale_betas_zero_snr=True)
    close(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert ours.betas[-1] == 1.0 and ours.alphas_cumprod[-1] == 0.0
    assert ours.snr[-1] == 0 and ours.log_snr[-1] == -math.inf and ours.sigmas[-1] == math.inf
    # the first alpha_bar is kept by the rescale
    assert ours.alphas_cumprod[0] == pytest.approx(df.NoiseSchedule.from_name(name).alphas_cumprod[0].item())


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("zero", [False, True])
def test_diffusers_config_round_trip(name, zero):
    ours = df.NoiseSchedule.from_name(name, 200, zero_terminal_snr=zero)
    scheduler = DDPMScheduler(**ours.to_diffusers_config())
    close(ours.alphas_cumprod, scheduler.alphas_cumprod)
    back = df.NoiseSchedule.from_diffusers(scheduler.config)
    assert torch.equal(back.betas, ours.betas) and back.zero_terminal_snr == zero
    assert torch.equal(df.NoiseSchedule.from_dict(ours.to_dict()).betas, ours.betas)


def test_custom_betas_round_trip_through_diffusers():
    betas = torch.linspace(1e-3, 0.05, 100, dtype=torch.float64) ** 1.3
    ours = df.NoiseSchedule.from_betas(betas)
    close(ours.alphas_cumprod, DDPMScheduler(**ours.to_diffusers_config()).alphas_cumprod)
    assert torch.equal(df.NoiseSchedule.from_dict(ours.to_dict()).betas, ours.betas)


def test_derived_quantities_are_float64_closed_forms():
    s = df.NoiseSchedule.from_name("linear")
    ab = torch.cumprod(1 - s.betas, 0)
    assert s.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(s.sigmas, ((1 - ab) / ab).sqrt())
    torch.testing.assert_close(s.snr, 1 / s.sigmas**2)
    torch.testing.assert_close(s.log_snr, -2 * s.sigmas.log())


def test_fractional_lookup_interpolates_log_sigma_and_inverts():
    s = df.NoiseSchedule.from_name("cosine")
    t = torch.tensor([0.0, 10.0, 10.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    ls = s.sigmas.log()
    expected = torch.stack([ls[0], ls[10], 0.75 * ls[10] + 0.25 * ls[11], 0.5 * ls[500] + 0.5 * ls[501],
                            0.1 * ls[998] + 0.9 * ls[999], ls[999]]).exp()
    torch.testing.assert_close(s.sigma_at(t), expected)
    torch.testing.assert_close(s.t_for_sigma(s.sigma_at(t)), t)
    torch.testing.assert_close(s.alpha_bar_at(torch.arange(1000.)), s.alphas_cumprod)


def test_zero_snr_lookup_at_the_end():
    s = df.NoiseSchedule.from_name("linear", zero_terminal_snr=True)
    assert s.sigma_at(999.0) == math.inf and s.alpha_bar_at(999.0) == 0
    assert s.sigma_at(998.0) == s.sigmas[998]
    assert s.t_for_sigma(math.inf) == 999
    assert math.isfinite(s.sigma_max)


@settings(max_examples=150, deadline=None)
@given(T=st.integers(2, 1500), frac=st.floats(0, 1), spacing=st.sampled_from(["leading", "trailing", "linspace"]))
def test_spacing_property(T, frac, spacing):
    n = max(1, round(frac * T))
    ts = spaced_timesteps(T, n, spacing)
    assert ts.shape == (n,)
    assert (ts >= 0).all() and (ts <= T - 1).all() and (ts == ts.round()).all()
    assert (ts[1:] < ts[:-1]).all()
    if spacing == "trailing":
        assert ts[0] == T - 1
    ddim = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ddim.set_timesteps(n)
    theirs = ddim.timesteps.double()
    if spacing == "trailing":  # diffusers sometimes appends an out-of-range -1 (see spaced_timesteps)
        theirs = theirs[:n]
    assert torch.equal(ts, theirs)


def test_karras_grid_closed_form():
    g = karras_sigmas(5, 0.1, 80.0, rho=7.0)
    assert g[0] == pytest.approx(80.0) and g[4] == pytest.approx(0.1) and g[5] == 0
    mid = (80.0 ** (1 / 7) + 0.5 * (0.1 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert g[2] == pytest.approx(mid)
    s = df.NoiseSchedule.from_name("linear")
    e = s.sigma_grid(8, "exponential")
    assert np.allclose(np.diff(np.log(e[:-1].numpy())), np.log(s.sigma_min / s.sigma_max) / 7)
    d = s.sigma_grid(10, "default", "trailing")
    assert d[-1] == 0 and d[0] == s.sigmas[-1] and len(d) == 11


@pytest.mark.parametrize("call, words", [
    (lambda: df.NoiseSchedule.from_name("quadratic"), ["schedule name", "linear", "cosine", "sigmoid"]),
    (lambda: df.NoiseSchedule.from_betas([0.1, 1.2, 0.3]), ["betas", "(0, 1)"]),
    (lambda: df.NoiseSchedule.from_betas([0.0, 0.1, 0.3]), ["betas", "(0, 1)"]),
    (lambda: df.NoiseSchedule.from_betas([0.1, 1.0, 0.3], zero_terminal_snr=True), ["betas", "zero-terminal-SNR"]),
    (lambda: df.NoiseSchedule.from_name("linear", 100).sigma_at(100.0), ["t", "[0, 99]"]),
    (lambda: df.NoiseSchedule.from_name("linear", 100).sigma_at(-1.0), ["t", "[0, 99]"]),
    (lambda: df.NoiseSchedule.from_name("linear", 100).timesteps(101), ["steps", "100"]),
    (lambda: df.NoiseSchedule.from_name("linear", 100).timesteps(0), ["steps", ">= 1"]),
    (lambda: df.NoiseSchedule.from_name("linear", 100).timesteps(5, "uniform"), ["spacing", "trailing"]),
    (lambda: df.NoiseSchedule.from_name("linear", 100).sigma_grid(5, "beta"), ["sigmas", "karras"]),
    (lambda: df.NoiseSchedule.from_diffusers({"beta_schedule": "laplace"}), ["beta_schedule", "squaredcos_cap_v2"]),
])
def test_bad_input_names_the_parameter_and_choices(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for w in words:
        assert w in str(err.value)
