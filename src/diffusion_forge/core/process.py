"""The forward process and the conversions between what a denoiser may predict.

With alpha_bar_t from a :class:`~diffusion_forge.core.schedules.NoiseSchedule` (diffusers indexing, the
clean data x_0 sits before t = 0):

    q(x_t | x_0)        = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)               (closed form)
    q(x_t | x_{t-1})    = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)                        (one Markov step)
    q(x_{t-1} | x_t, x_0) = N(mu_t, beta_tilde_t I),                                   (the posterior)
        mu_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
             + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t,
        beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t.

Predictions (diffusers' names), with a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t):
    "epsilon":      eps
    "sample":       x_0
    "v_prediction": v = a eps - s x_0                          (Salimans & Ho 2022)
    "score":        grad log q(x_t) = -eps / s
"""
from __future__ import annotations

from typing import Literal

import torch

from .schedules import NoiseSchedule

PREDICTIONS = ("epsilon", "sample", "v_prediction")
CONVERTIBLE = PREDICTIONS + ("score",)
Prediction = Literal["epsilon", "sample", "v_prediction", "score"]


def check_prediction(prediction: str, allowed=PREDICTIONS) -> str:
    if prediction not in allowed:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(allowed)}")
    return prediction


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (batch,) or scalar tensor of coefficients against x of shape (batch, ...)."""
    values = torch.as_tensor(values).to(device=like.device, dtype=like.dtype)
    if values.ndim == 0:
        return values
    if values.ndim != 1 or values.shape[0] != like.shape[0]:
        raise ValueError(f"t must be a scalar or have shape (batch,) = ({like.shape[0]},), got {tuple(values.shape)}")
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _lookup(table: torch.Tensor, schedule: NoiseSchedule, t) -> torch.Tensor:
    """table[t] for integer t, checked against the schedule's range (float64)."""
    t = schedule.check_t(t)
    if (t != t.round()).any():
        raise ValueError("t must be an integer timestep here; use schedule.alpha_bar_at for fractional t")
    return table[t.long()]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}; these tensors must have the same shape")


# ---------------------------------------------------------------------------------------------
# The forward process

def q_sample(x0: torch.Tensor, t, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (t may be fractional)."""
    _check_same_shape(x0=x0, noise=noise)
    ab = _per_sample(schedule.alpha_bar_at(t), x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def q_mean_var(x0: torch.Tensor, t, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sqrt(alpha_bar_t) x_0 and variance 1 - alpha_bar_t of q(x_t | x_0)."""
    ab = _per_sample(schedule.alpha_bar_at(t), x0)
    return ab.sqrt() * x0, (1 - ab).expand_as(x0)


def q_step(x_prev: torch.Tensor, t, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """One Markov step x_{t-1} -> x_t: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps.

    Applied for t = 0, 1, ..., k starting from the data, it reaches q(x_k | x_0)."""
    _check_same_shape(x_prev=x_prev, noise=noise)
    beta = _per_sample(_lookup(schedule.betas, schedule, t), x_prev)
    return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise


def posterior_coefficients(schedule: NoiseSchedule, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_x0, c_xt, beta_tilde) with mu_t = c_x0 x_0 + c_xt x_t and variance beta_tilde_t (float64)."""
    ab, ab_prev = _lookup(schedule.alphas_cumprod, schedule, t), _lookup(schedule.alphas_cumprod_prev, schedule, t)
    beta = _lookup(schedule.betas, schedule, t)
    c_x0 = ab_prev.sqrt() * beta / (1 - ab)
    c_xt = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta
    return c_x0, c_xt, beta_tilde


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, t, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) (variance 0 at t = 0: x_{-1} is x_0 itself)."""
    _check_same_shape(x0=x0, x_t=x_t)
    c_x0, c_xt, beta_tilde = posterior_coefficients(schedule, t)
    mean = _per_sample(c_x0, x0) * x0 + _per_sample(c_xt, x0) * x_t
    return mean, _per_sample(beta_tilde, x0).expand_as(x0)


# ---------------------------------------------------------------------------------------------
# Conversions between predictions

def to_x0_eps(pred: torch.Tensor, prediction: Prediction, x_t: torch.Tensor,
              alpha_bar) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by a prediction of the given kind at noise level alpha_bar (per sample)."""
    check_prediction(prediction, CONVERTIBLE)
    _check_same_shape(pred=pred, x_t=x_t)
    ab = _per_sample(alpha_bar, x_t)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    if prediction in ("epsilon", "score"):
        eps = pred if prediction == "epsilon" else -s * pred          # score = -eps / s
        return (x_t - s * eps) / a, eps                                # x_0 = (x_t - s eps) / a
    if prediction == "sample":
        return pred, (x_t - a * pred) / s                              # eps = (x_t - a x_0) / s
    return a * x_t - s * pred, s * x_t + a * pred                      # from v = a eps - s x_0


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, prediction: Prediction, alpha_bar) -> torch.Tensor:
    """The prediction of the given kind that (x_0, eps) correspond to."""
    check_prediction(prediction, CONVERTIBLE)
    ab = _per_sample(alpha_bar, x0)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    return {"epsilon": lambda: eps, "sample": lambda: x0,
            "v_prediction": lambda: a * eps - s * x0, "score": lambda: -eps / s}[prediction]()


def convert(pred: torch.Tensor, src: Prediction, dst: Prediction, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
    """Re-express a prediction of kind ``src`` as kind ``dst`` at the same x_t and noise level."""
    if src == dst:
        return pred
    x0, eps = to_x0_eps(pred, src, x_t, alpha_bar)
    return from_x0_eps(x0, eps, dst, alpha_bar)


def velocity(x0: torch.Tensor, noise: torch.Tensor, alpha_bar) -> torch.Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (diffusers' get_velocity)."""
    return from_x0_eps(x0, noise, "v_prediction", alpha_bar)
