"""The forward process and the prediction conversions, against diffusers and closed forms."""
import pytest
import torch
from diffusers import DDPMScheduler

import diffusion_forge as df
from diffusion_forge.core.process import posterior_coefficients, q_mean_var


@pytest.fixture(params=["linear", "cosine", "scaled_linear"])
def pair(request):
    cfg = {"cosine": "squaredcos_cap_v2"}.get(request.param, request.param)
    return df.NoiseSchedule.from_name(request.param), DDPMScheduler(beta_schedule=cfg)


def test_closed_form_equals_diffusers_add_noise_and_velocity(pair):
    ours, theirs = pair
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    # As diffusers runs it (float32 alpha_bar): 1 - alpha_bar cancels near t = 0 (relative error up to
    # ~1e-4 in sqrt(1 - alpha_bar) at alpha_bar ~ 0.9998), so allow 2e-5 absolute on unit-scale data.
    torch.testing.assert_close(df.q_sample(x0, t, noise, ours), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=2e-5)
    # The same formulas in float64 on our alpha_bar: equal to rounding.
    theirs.alphas_cumprod = ours.alphas_cumprod.clone()
    x0, noise = x0.double(), noise.double()
    torch.testing.assert_close(df.q_sample(x0, t, noise, ours), theirs.add_noise(x0, noise, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(df.velocity(x0, noise, ours.alphas_cumprod[t]), theirs.get_velocity(x0, noise, t),
                               rtol=1e-12, atol=1e-12)


def test_markov_chain_reaches_the_closed_form():
    """Iterate q(x_t | x_{t-1}) from a fixed x_0 for t = 0..k on N independent chains. The sample mean
    has standard error sqrt(var / N) and the sample variance sqrt(2 / N) var (Gaussian), so 5 standard
    errors is a false-alarm rate below 1e-6 per check."""
    sched = df.NoiseSchedule.from_name("linear", 200)
    N = 200_000
    x0 = torch.tensor([0.9, -0.4, 0.0], dtype=torch.float64)
    x = x0.expand(N, 3).clone()
    g = torch.Generator().manual_seed(1)
    for k in range(120):
        x = df.q_step(x, k, torch.randn(x.shape, generator=g, dtype=torch.float64), sched)
        if k in (0, 9, 59, 119):
            mean, var = q_mean_var(x0[None], k, sched)
            se_mean, se_var = (var[0] / N).sqrt(), var[0] * (2 / N) ** 0.5
            assert ((x.mean(0) - mean[0]).abs() < 5 * se_mean).all(), k
            assert ((x.var(0) - var[0]).abs() < 5 * se_var).all(), k


def test_posterior_mean_equals_the_ddpm_formula():
    """mu(x_t, x_0) with x_0 from eps equals Ho et al. eq. 11: (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t)."""
    sched = df.NoiseSchedule.from_name("cosine", 1000)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    x_t = df.q_sample(x0, t, eps, sched)
    mean, var = df.q_posterior(x0, x_t, t, sched)
    beta, ab = sched.betas[t][:, None], sched.alphas_cumprod[t][:, None]
    torch.testing.assert_close(mean, (x_t - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt())
    ab_prev = sched.alphas_cumprod[t - 1][:, None]
    torch.testing.assert_close(var, ((1 - ab_prev) / (1 - ab) * beta).expand_as(var))


def test_posterior_matches_diffusers_ddpm_step_mean():
    """diffusers' DDPMScheduler.step at t = 0 adds no noise: its output is the posterior mean."""
    ours, theirs = df.NoiseSchedule.from_name("linear"), DDPMScheduler(clip_sample=False)
    theirs.set_timesteps(1000)
    g = torch.Generator().manual_seed(3)
    x_t, eps = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    prev = theirs.step(eps, 0, x_t).prev_sample
    x0 = df.to_x0_eps(eps.double(), "epsilon", x_t.double(), ours.alphas_cumprod[0])[0]
    mean, var = df.q_posterior(x0, x_t.double(), torch.tensor([0, 0]), ours)
    torch.testing.assert_close(mean.float(), prev, rtol=1e-5, atol=1e-5)
    assert (var == 0).all() and posterior_coefficients(ours, torch.tensor(0))[0].item() == pytest.approx(1, rel=1e-12)


@pytest.mark.parametrize("src", ["epsilon", "sample", "v_prediction", "score"])
@pytest.mark.parametrize("dst", ["epsilon", "sample", "v_prediction", "score"])
def test_every_conversion_round_trips(src, dst):
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.999, 0.7, 0.5, 0.1, 1e-4], dtype=torch.float64)
    x_t = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * eps
    pred = df.from_x0_eps(x0, eps, src, ab)
    there = df.convert(pred, src, dst, x_t, ab)
    torch.testing.assert_close(there, df.from_x0_eps(x0, eps, dst, ab))
    torch.testing.assert_close(df.convert(there, dst, src, x_t, ab), pred)


def test_v_and_sample_survive_zero_snr():
    x_t = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(3, 4, dtype=torch.float64)
    x0, eps = df.to_x0_eps(v, "v_prediction", x_t, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(x0, -v)
    torch.testing.assert_close(eps, x_t)


def test_shape_and_range_errors():
    s = df.NoiseSchedule.from_name("linear", 100)
    with pytest.raises(ValueError, match="shape mismatch"):
        df.q_sample(torch.zeros(2, 3), torch.tensor([1, 2]), torch.zeros(2, 4), s)
    with pytest.raises(ValueError, match=r"t must .*\(batch,\)"):
        df.q_sample(torch.zeros(2, 3), torch.tensor([1, 2, 3]), torch.zeros(2, 3), s)
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        df.q_step(torch.zeros(2, 3), 100, torch.zeros(2, 3), s)
    with pytest.raises(ValueError, match="epsilon, sample, v_prediction"):
        df.convert(torch.zeros(2), "x0", "epsilon", torch.zeros(2), 0.5)


def test_coefficients_are_computed_in_float64_and_cast_once():
    """sqrt(1 - alpha_bar) at the cosine schedule's t = 0 (alpha_bar = 0.99996): 1 - alpha_bar taken in float32
    cancels (2.6e-4 relative error); taken in float64 and cast once it is float32-exact (< 1e-6)."""
    sched = df.NoiseSchedule.from_name("cosine", 1000)
    exact = (1 - sched.alphas_cumprod[0]).sqrt()
    ones, zeros = torch.ones(2, 3), torch.zeros(2, 3)
    s = df.q_sample(zeros, torch.tensor([0, 0]), ones, sched)                     # = sqrt(1 - ab) * 1
    assert s.dtype == torch.float32 and ((s.double() - exact).abs() / exact).max() < 1e-6
    a = df.velocity(ones, zeros, sched.alphas_cumprod[[0, 0]].float())           # -sqrt(1 - ab) from float32 ab
    assert ((a.double() + exact).abs() / exact).max() > 1e-5                     # what a float32 ab costs
    v = df.velocity(ones, zeros, sched.alphas_cumprod[[0, 0]])                   # float64 ab: cast once
    assert ((v.double() + exact).abs() / exact).max() < 1e-6
    x0, eps = df.to_x0_eps(torch.zeros(2, 3), "v_prediction", ones, sched.alphas_cumprod[[0, 0]])
    assert ((eps.double() - exact).abs() / exact).max() < 1e-6                    # eps = s x_t + a v


def test_one_refusal_of_epsilon_at_snr_zero():
    from diffusion_forge.core.process import check_prediction_at_snr0
    assert check_prediction_at_snr0("epsilon", False) == "epsilon"
    assert [check_prediction_at_snr0(p, True) for p in ("v_prediction", "sample")] == ["v_prediction", "sample"]
    with pytest.raises(ValueError, match="zero-terminal-SNR.*zero_terminal_snr needs prediction='v_prediction'.*hint"):
        check_prediction_at_snr0("epsilon", True, "; hint")
    with pytest.raises(ValueError, match="epsilon, sample, v_prediction"):
        check_prediction_at_snr0("eps", False)
