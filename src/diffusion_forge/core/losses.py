"""Training objectives and the variational bound.

Simplified loss (Ho et al. 2020), for a prediction target y(x_0, eps, t) of the chosen kind:

    L_simple = E_{t ~ U{0..T-1}, x_0, eps} [ w(t) || model(x_t, t) - y ||^2 ]

where model is ``Denoiser.network``: the loss and the bound see the network through the same
:class:`~diffusion_forge.Denoiser` the samplers use, so the schedule and prediction type mean one thing.

Min-SNR-gamma weighting (Hang et al. 2023) clips the per-timestep weight of the equivalent
x_0-loss at gamma: w_x0 = min(SNR, gamma). Expressed for each target (since ||eps - eps_hat||^2 =
SNR ||x_0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) ||x_0 - x0_hat||^2):

    epsilon: min(SNR, gamma) / SNR      sample: min(SNR, gamma)      v_prediction: min(SNR, gamma) / (SNR + 1)

Variational bound (Sohl-Dickstein et al. 2015; Ho et al. 2020; Nichol & Dhariwal 2021), in nats,
with the reverse process p(x_{t-1} | x_t) = N(mu(x_t, x0_hat), var_t) built from the model's x_0:

    L = KL(q(x_{T-1} | x_0) || N(0, I))                                 (prior term)
      + sum_{t=1}^{T-1} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   (one term per t)
      - log p(x_0 | x at t = 0)                                          (discretised Gaussian decoder)

and bits/dim = L / (D ln 2) for D dimensions of 8-bit data scaled to [-1, 1].
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from .process import check_prediction, check_prediction_at_snr0, from_x0_eps, posterior_coefficients, q_sample, to_x0_eps
from .schedules import NoiseSchedule

F64 = torch.float64
Variance = Literal["beta_tilde", "beta"]


def _denoiser(model, schedule: NoiseSchedule | None, prediction: str | None):
    """The Denoiser the loss and the bound see the network through (the same one the samplers use): a
    (wrapped) Denoiser as it is, or a network with its schedule and prediction; epsilon refused at SNR 0."""
    from ..denoise.denoiser import as_denoiser

    D = as_denoiser(model, schedule, prediction)
    check_prediction_at_snr0(D.prediction, D.schedule.zero_terminal_snr)
    return D


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like).reshape(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------
# The simplified loss

def training_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the network should output for this (x_0, eps, t): eps, x_0 or v = a eps - s x_0."""
    return from_x0_eps(x0, noise, check_prediction(prediction), alpha_bar)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-timestep weight of min-SNR-gamma for the given prediction target (see the module docstring)."""
    check_prediction(prediction)
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 (5 is the paper's choice), got {gamma}")
    clipped = snr.clamp(max=gamma)
    return {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1)}[prediction]


NOISE_LEVELS = ("uniform", "log_normal")


def sample_timesteps(batch: int, schedule: NoiseSchedule, generator: torch.Generator | None = None,
                     noise_levels: str = "uniform", log_sigma_mean: float = -1.2,
                     log_sigma_std: float = 1.2) -> torch.Tensor:
    """The training noise levels as timesteps, drawn on the CPU (float64, shape (batch,)).

    uniform:     t ~ U{0, ..., T-1} (Ho et al. 2020)
    log_normal:  ln sigma ~ N(log_sigma_mean, log_sigma_std^2), t = t(sigma) (Karras et al. 2022, P_mean / P_std),
                 with sigma^2 = (1 - alpha_bar) / alpha_bar; fractional t, clamped to the schedule's range."""
    if noise_levels == "uniform":
        return torch.randint(0, schedule.num_timesteps, (batch,), generator=generator).to(F64)
    if noise_levels == "log_normal":
        z = torch.randn(batch, generator=generator, dtype=F64)
        return schedule.t_for_sigma((log_sigma_mean + log_sigma_std * z).exp())
    raise ValueError(f"noise_levels must be one of {', '.join(NOISE_LEVELS)}, got {noise_levels!r}")


def diffusion_loss(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    schedule: NoiseSchedule | None = None,
    prediction: str | None = None,
    min_snr_gamma: float | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Literal["mean", "none"] = "mean",
    cond: dict | None = None,
    **cond_kwargs,
) -> torch.Tensor:
    """The simplified loss of a network ``model(x_t, t, **cond)`` (or a :class:`Denoiser`, whose schedule and
    prediction are then used) on a batch of clean data x_0, computed through ``Denoiser.network``.

    t and eps are drawn on the CPU from ``generator`` unless given. ``cond``: the network's conditioning
    (a dict; keyword arguments are merged into it). With ``reduction="none"`` the per-sample losses (mean
    over the non-batch dimensions, weights applied) are returned."""
    D = _denoiser(model, schedule, prediction)
    schedule, prediction, cond = D.schedule, D.prediction, {**(cond or {}), **cond_kwargs}
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule, generator)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
    alpha_bar = schedule.alpha_bar_at(t)
    x_t = q_sample(x0, t, noise, schedule)                           # x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps
    target = training_target(prediction, x0, noise, alpha_bar)
    out = D.network(x_t, torch.as_tensor(t).to(device=x0.device, dtype=torch.float32), **cond)
    per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)   # ||model - y||^2 per sample
    if min_snr_gamma is not None:
        snr = alpha_bar / (1 - alpha_bar)
        per_sample = per_sample * min_snr_weight(snr, min_snr_gamma, prediction).to(per_sample)
    return per_sample.mean() if reduction == "mean" else per_sample


# ---------------------------------------------------------------------------------------------
# The variational bound

def normal_kl(mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """KL(N(m1, v1) || N(m2, v2)) elementwise = 0.5 (log v2/v1 + (v1 + (m1 - m2)^2) / v2 - 1)."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                                        bins: int = 256) -> torch.Tensor:
    """log P(x) for x on the ``bins`` levels of [-1, 1], P = the N(mean, std^2) mass of x's bin
    [x - 1/(bins-1), x + 1/(bins-1)]; the first and last bins extend to -inf and +inf."""
    half = 1.0 / (bins - 1)
    upper = torch.where(x > 1 - half, torch.full_like(x, math.inf), (x + half - mean) / std)
    lower = torch.where(x < -1 + half, torch.full_like(x, -math.inf), (x - half - mean) / std)
    # P = Phi(upper) - Phi(lower), computed on the side of the mean where it does not cancel
    flip = lower > 0
    lo, up = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_up, log_lo = torch.special.log_ndtr(up), torch.special.log_ndtr(lo)
    return log_up + torch.log1p(-torch.exp((log_lo - log_up).clamp(max=0)).clamp(max=1 - 1e-15))


def reverse_variance(schedule: NoiseSchedule, variance: Variance = "beta_tilde") -> torch.Tensor:
    """The fixed variance of p(x_{t-1} | x_t) per t: beta_tilde_t or beta_t (Ho et al.'s two choices),
    with the t = 0 entry set to beta_tilde_1 so the decoder has a non-zero width (as improved-diffusion)."""
    ab, ab_prev, beta = schedule.alphas_cumprod, schedule.alphas_cumprod_prev, schedule.betas
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"unknown variance {variance!r}; choose one of: beta_tilde, beta")
    var = beta_tilde.clone() if variance == "beta_tilde" else beta.clone()
    var[0] = beta_tilde[1]
    return var


def prior_term(x0: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """KL(q(x_{T-1} | x_0) || N(0, I)) summed over dimensions, per sample (nats)."""
    ab = schedule.alphas_cumprod[-1]
    x = x0.to(F64)
    kl = normal_kl(ab.sqrt() * x, (1 - ab).expand_as(x), torch.zeros_like(x), torch.ones_like(x))
    return kl.flatten(1).sum(1)


def vlb_term(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0_pred: torch.Tensor,
             schedule: NoiseSchedule, variance: Variance = "beta_tilde") -> torch.Tensor:
    """The bound's term at integer timesteps t (shape (batch,)), per sample, in nats:
    KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t >= 1 and -log p(x_0 | x at t=0) for t = 0."""
    x0, x_t, x0_pred = x0.to(F64), x_t.to(F64), x0_pred.to(F64)
    c_x0, c_xt, beta_tilde = posterior_coefficients(schedule, t)
    c_x0, c_xt, beta_tilde = _rows(c_x0, x0), _rows(c_xt, x0), _rows(beta_tilde, x0)
    var = _rows(reverse_variance(schedule, variance)[torch.as_tensor(t).long()], x0)
    mean_q, mean_p = c_x0 * x0 + c_xt * x_t, c_x0 * x0_pred + c_xt * x_t  # posterior means, true vs model
    safe_q = torch.where(beta_tilde > 0, beta_tilde, torch.ones_like(beta_tilde))
    kl = normal_kl(mean_q, safe_q.expand_as(x0), mean_p, var.expand_as(x0)).flatten(1).sum(1)
    decoder = -discretized_gaussian_log_likelihood(x0, mean_p, var.sqrt()).flatten(1).sum(1)
    return torch.where(torch.as_tensor(t) == 0, decoder, kl)


def _sampled_term(D, x0: torch.Tensor, t: torch.Tensor, variance: Variance, generator: torch.Generator | None,
                  cond: dict) -> torch.Tensor:
    """The bound's term at t for one draw x_t ~ q(x_t | x_0), with the denoiser's x_0 prediction (nats)."""
    noise = torch.randn(x0.shape, generator=generator, dtype=F64)
    x_t = q_sample(x0.to(F64), t, noise, D.schedule)
    out = D.network(x_t.to(x0.dtype), t.to(torch.float32), **cond)
    x0_pred = to_x0_eps(out.to(F64), D.prediction, x_t, D.schedule.alpha_bar_at(t))[0]
    return vlb_term(x0, x_t, t, x0_pred, D.schedule, variance)


@torch.no_grad()
def variational_bound(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    schedule: NoiseSchedule | None = None,
    prediction: str | None = None,
    generator: torch.Generator | None = None,
    variance: Variance = "beta_tilde",
    cond: dict | None = None,
    **cond_kwargs,
) -> torch.Tensor:
    """The full bound per sample in nats: prior + all T terms (T network calls per batch). ``model``: a
    network (with its schedule and prediction) or a :class:`Denoiser`."""
    D = _denoiser(model, schedule, prediction)
    cond = {**(cond or {}), **cond_kwargs}
    total = prior_term(x0, D.schedule)
    for step in range(D.schedule.num_timesteps):
        t = torch.full((x0.shape[0],), float(step), dtype=F64)
        total = total + _sampled_term(D, x0, t, variance, generator, cond)
    return total


@torch.no_grad()
def variational_bound_mc(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    schedule: NoiseSchedule | None = None,
    prediction: str | None = None,
    num_t: int = 32,
    generator: torch.Generator | None = None,
    variance: Variance = "beta_tilde",
    cond: dict | None = None,
    **cond_kwargs,
) -> torch.Tensor:
    """An unbiased estimate of :func:`variational_bound` from at most ``num_t`` network calls per sample.

    Stratified Monte Carlo over t: the decoder term (t = 0) is computed exactly, and {1..T-1} is cut
    into num_t - 1 strata whose edges are geometric (the terms fall steeply with t, so small t gets
    narrow strata); one uniform draw of t per stratum, weighted by the stratum's size. Returns
    per-sample estimates in nats."""
    D = _denoiser(model, schedule, prediction)
    cond = {**(cond or {}), **cond_kwargs}
    T, n = D.schedule.num_timesteps, x0.shape[0]
    if not 1 <= num_t <= T:
        raise ValueError(f"num_t must lie in [1, {T}] (the schedule's num_timesteps), got {num_t}")
    total = prior_term(x0, D.schedule)
    for lo, hi in stratify_timesteps(T, num_t):
        t = torch.randint(lo, hi, (n,), generator=generator).to(F64)
        term = _sampled_term(D, x0, t, variance, generator, cond)
        total = total + (hi - lo) * term
    return total


def stratify_timesteps(T: int, num_t: int) -> list[tuple[int, int]]:
    """[lo, hi) strata covering {0..T-1}: {0} alone, then geometric edges over {1..T-1}."""
    if num_t == 1:
        return [(0, T)]
    edges = torch.logspace(0, math.log10(T), num_t, dtype=F64).round().long().tolist()
    edges = sorted(set([0, 1] + [min(max(e, 1), T) for e in edges] + [T]))
    return list(zip(edges[:-1], edges[1:]))


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Convert a per-sample bound in nats over ``dims`` dimensions to bits per dimension."""
    return nats / (dims * math.log(2))
