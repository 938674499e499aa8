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

F64 = torch.float64

PREDICTIONS = ("epsilon", "sample", "v_prediction")
CONVERTIBLE = PREDICTIONS + ("score",)
Prediction = Literal["epsilon", "sample", "v_prediction", "score"]


def check_prediction(prediction: str, allowed=PREDICTIONS) -> str:
    if prediction not in allowed:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(allowed)}")
    return prediction


def check_prediction_at_snr0(prediction: str, zero_snr: bool = True, hint: str = "") -> str:
    """The one refusal of epsilon prediction where SNR = 0 (the end of a zero-terminal-SNR schedule): there
    alpha_bar = 0 and x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) = (x_t - eps) / 0 cannot be
    recovered from eps, while v (= -x_0 at SNR 0) and x_0 predictions stay defined (Lin et al. 2023).
    ``zero_snr``: whether SNR 0 is reached (a zero-terminal-SNR schedule, or sigma = inf). ``hint`` is
    appended to the message. Returns the (checked) prediction."""
    check_prediction(prediction)
    if zero_snr and prediction == "epsilon":
        raise ValueError("an epsilon-prediction model cannot predict x0 at SNR 0, the end of a zero-terminal-SNR "
                         "schedule (x0 = (x_t - eps) / 0): zero_terminal_snr needs prediction='v_prediction' or "
                         f"'sample' (Lin et al. 2023){hint}")
    return prediction


def _per_sample(values, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (batch,) or scalar tensor of coefficients against x of shape (batch, ...): the one cast
    of a float64 schedule quantity to x's dtype (on the CPU, then to x's device)."""
    values = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=F64)
    if values.ndim not in (0, 1) or (values.ndim == 1 and values.shape[0] != like.shape[0]):
        raise ValueError(f"t must be a scalar or have shape (batch,) = ({like.shape[0]},), got {tuple(values.shape)}")
    values = values.to(like.dtype).to(like.device)
    return values if values.ndim == 0 else values.reshape(-1, *([1] * (like.ndim - 1)))


def _f64(values) -> torch.Tensor:
    """A schedule quantity (alpha_bar, beta, ...) as float64: the coefficients are computed at this precision."""
    return values.to(F64) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=F64)


def _sqrt_pair(alpha_bar, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)), computed in float64 and cast once to like's dtype
    (1 - alpha_bar in float32 cancels near t = 0: 2.6e-4 relative error in s at the cosine schedule's t = 0)."""
    ab = _f64(alpha_bar)
    return _per_sample(ab.sqrt(), like), _per_sample((1 - ab).sqrt(), like)


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
    a, s = _sqrt_pair(schedule.alpha_bar_at(t), x0)
    return a * x0 + s * noise


def q_mean_var(x0: torch.Tensor, t, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sqrt(alpha_bar_t) x_0 and variance 1 - alpha_bar_t of q(x_t | x_0)."""
    ab = _f64(schedule.alpha_bar_at(t))
    return _per_sample(ab.sqrt(), x0) * x0, _per_sample(1 - ab, x0).expand_as(x0)


def q_step(x_prev: torch.Tensor, t, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """One Markov step x_{t-1} -> x_t: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps.

    Applied for t = 0, 1, ..., k starting from the data, it reaches q(x_k | x_0)."""
    _check_same_shape(x_prev=x_prev, noise=noise)
    beta = _lookup(schedule.betas, schedule, t)
    return _per_sample((1 - beta).sqrt(), x_prev) * x_prev + _per_sample(beta.sqrt(), x_prev) * noise


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
    a, s = _sqrt_pair(alpha_bar, x_t)
    if prediction in ("epsilon", "score"):
        eps = pred if prediction == "epsilon" else -s * pred          # score = -eps / s
        return (x_t - s * eps) / a, eps                                # x_0 = (x_t - s eps) / a
    if prediction == "sample":
        return pred, (x_t - a * pred) / s                              # eps = (x_t - a x_0) / s
    return a * x_t - s * pred, s * x_t + a * pred                      # from v = a eps - s x_0


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, prediction: Prediction, alpha_bar) -> torch.Tensor:
    """The prediction of the given kind that (x_0, eps) correspond to."""
    check_prediction(prediction, CONVERTIBLE)
    a, s = _sqrt_pair(alpha_bar, x0)
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
