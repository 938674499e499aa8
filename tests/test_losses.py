"""Training losses and the variational bound, against closed forms and independent computations."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

import diffusion_forge as df
from diffusion_forge.core.losses import (discretized_gaussian_log_likelihood, normal_kl, stratify_timesteps,
                                    training_target)
from toy import QuantisedGaussian

PREDS = ["epsilon", "sample", "v_prediction"]


def test_targets_equal_diffusers():
    sched, theirs = df.NoiseSchedule.from_name("linear"), DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ab = sched.alphas_cumprod[t]
    assert torch.equal(training_target("epsilon", x0, noise, ab), noise)
    assert torch.equal(training_target("sample", x0, noise, ab), x0)
    torch.testing.assert_close(training_target("v_prediction", x0, noise, ab), theirs.get_velocity(x0, noise, t))


@pytest.mark.parametrize("prediction", PREDS)
def test_min_snr_weight_equals_clipped_x0_loss(prediction):
    """Hang et al.: every target's weighted loss equals min(SNR, gamma) * ||x0 - x0_hat||^2."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.9999, 0.9, 0.5, 0.05, 1e-3], dtype=torch.float64)
    x_t = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * eps
    pred = training_target(prediction, x0, eps, ab) + 0.1 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    snr = ab / (1 - ab)
    weighted = df.min_snr_weight(snr, 5.0, prediction) * ((pred - training_target(prediction, x0, eps, ab)) ** 2).sum(1)
    x0_hat = df.to_x0_eps(pred, prediction, x_t, ab)[0]
    torch.testing.assert_close(weighted, snr.clamp(max=5.0) * ((x0_hat - x0) ** 2).sum(1))


@pytest.mark.parametrize("prediction", PREDS)
def test_diffusion_loss_is_zero_for_the_oracle_and_matches_a_hand_computation(prediction):
    sched = df.NoiseSchedule.from_name("cosine", 100)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(8, 2, 4, 4, generator=g), torch.randn(8, 2, 4, 4, generator=g)
    t = torch.randint(0, 100, (8,), generator=g).double()
    ab = sched.alphas_cumprod[t.long()]
    target = training_target(prediction, x0, noise, ab)
    oracle = lambda x_t, tt: target  # noqa: E731
    assert df.diffusion_loss(oracle, x0, sched, prediction, t=t, noise=noise).item() < 1e-12
    zero = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    per = df.diffusion_loss(zero, x0, sched, prediction, t=t, noise=noise, min_snr_gamma=5.0, reduction="none")
    w = df.min_snr_weight(ab / (1 - ab), 5.0, prediction).float()
    torch.testing.assert_close(per, w * target.pow(2).flatten(1).mean(1))


@pytest.mark.parametrize("name, mean, std", [("cosine", -1.2, 1.2), ("linear", 0.4, 0.7)])
def test_log_normal_noise_levels_are_edm_sigmas_mapped_to_t(name, mean, std):
    """ln sigma(t) ~ N(mean, std^2): each draw's sigma equals exp(mean + std z) for the generator's own z (a second
    computation of the same draw, to the float64 interpolation), and the empirical CDF is the normal one."""
    from diffusion_forge.core.losses import sample_timesteps

    sched = df.NoiseSchedule.from_name(name)
    t = sample_timesteps(20000, sched, torch.Generator().manual_seed(3), "log_normal", mean, std)
    z = torch.randn(20000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma = (mean + std * z).exp()
    inside = (sigma > sched.sigma_min) & (sigma < float(sched.sigmas[-1]))
    assert t.dtype == torch.float64 and 0 <= t.min() and t.max() <= sched.num_timesteps - 1
    assert (t != t.round()).float().mean() > 0.99                              # fractional timesteps
    torch.testing.assert_close(sched.sigma_at(t)[inside], sigma[inside], rtol=1e-9, atol=0)
    assert torch.equal(t[sigma <= sched.sigma_min], torch.zeros_like(t[sigma <= sched.sigma_min]))
    log_s = sched.sigma_at(t).log().sort().values
    normal_cdf = 0.5 * (1 + torch.erf((log_s - mean) / (std * math.sqrt(2))))
    empirical = torch.arange(1, 20001, dtype=torch.float64) / 20000
    assert (normal_cdf - empirical).abs().max() < 0.012                       # Kolmogorov-Smirnov distance
    uniform = sample_timesteps(1000, sched, torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(0, 1000, (1000,), generator=torch.Generator().manual_seed(3)).double())
    with pytest.raises(ValueError, match="noise_levels must be one of uniform, log_normal"):
        sample_timesteps(4, sched, noise_levels="lognormal")


def test_diffusion_loss_refuses_epsilon_on_zero_snr():
    sched = df.NoiseSchedule.from_name("linear", 50, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero-terminal-SNR.*v_prediction"):
        df.diffusion_loss(lambda x, t: x, torch.zeros(2, 3), sched, "epsilon")
    with pytest.raises(ValueError, match="epsilon, sample, v_prediction"):
        df.diffusion_loss(lambda x, t: x, torch.zeros(2, 3), sched, "x0")


def test_normal_kl_and_discretised_likelihood_closed_forms():
    m1, v1, m2, v2 = (torch.tensor(x, dtype=torch.float64) for x in (0.3, 0.5, -0.2, 2.0))
    closed = 0.5 * math.log(2.0 / 0.5) + (0.5 + 0.25) / (2 * 2.0) - 0.5
    assert normal_kl(m1, v1, m2, v2).item() == pytest.approx(closed)
    # the 256 bins' probabilities sum to one, for a centred and an off-centre mean
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, std in [(0.0, 0.2), (0.97, 0.01), (-0.5, 3.0)]:
        p = discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(std)).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-9)
    # a narrow Gaussian centred on a level puts ~all its mass there
    lp = discretized_gaussian_log_likelihood(levels[100:101], levels[100:101], torch.tensor(1e-4))
    assert lp.item() == pytest.approx(0.0, abs=1e-9)


def test_strata_cover_every_timestep_once():
    for T, k in [(1000, 32), (300, 30), (10, 10), (7, 1)]:
        strata = stratify_timesteps(T, k)
        assert [t for lo, hi in strata for t in range(lo, hi)] == list(range(T)) and len(strata) <= k


@pytest.fixture(scope="module")
def bound_setup():
    """8-bit quantised N(0.1, 0.1^2) data in 40 independent dimensions, with its exact denoiser."""
    torch.set_num_threads(1)
    sched = df.NoiseSchedule.from_name("linear", 300)
    data = QuantisedGaussian(mean=0.1, std=0.1)
    g = torch.Generator().manual_seed(0)
    x0 = data.sample((100, 40), g)
    model = data.denoiser(sched, "epsilon")
    full = df.bits_per_dim(df.variational_bound(model, x0, sched, "epsilon", generator=g, variance="beta"), 40)
    return sched, data, x0, model, full


def test_bound_is_above_the_true_nll_and_close_to_it(bound_setup):
    """The bound is an upper bound on the model's NLL, itself >= the data's entropy; with the exact
    denoiser and the beta variance, T = 300 steps, the gap measured here is ~0.17 bits/dim: we state
    0.3 bits/dim as the margin. 3 standard errors allow for the finite sample."""
    _, data, _, _, full = bound_setup
    mean, se, H = full.mean().item(), full.std().item() / len(full) ** 0.5, data.entropy_bits()
    assert mean > H - 3 * se
    assert mean < H + 0.3


def test_monte_carlo_over_t_agrees_with_the_exact_sum(bound_setup):
    sched, _, x0, model, full = bound_setup
    g = torch.Generator().manual_seed(5)
    mc = df.bits_per_dim(df.variational_bound_mc(model, x0, sched, "epsilon", num_t=24, generator=g,
                                                 variance="beta"), 40)
    se = (full.var() / len(full) + mc.var() / len(mc)).sqrt().item()
    assert abs(mc.mean().item() - full.mean().item()) < 4 * se
    assert se < 0.1  # the comparison is informative: both estimates are tight


def test_bad_variance_and_num_t():
    sched = df.NoiseSchedule.from_name("linear", 20)
    with pytest.raises(ValueError, match="num_t must lie in \\[1, 20\\]"):
        df.variational_bound_mc(lambda x, t: x, torch.zeros(1, 2), sched, "sample", num_t=0)
    with pytest.raises(ValueError, match="beta_tilde, beta"):
        df.variational_bound(lambda x, t: x, torch.zeros(1, 2), sched, "sample", variance="learned")
