"""Shared bookkeeping for the samplers: the denoiser wrapper, per-sample noise, the start from pure noise.

Samplers work in "sigma space" (Karras et al. 2022): the state is

    x = x_t / sqrt(alpha_bar) = x_0 + sigma * eps,        alpha_bar = 1 / (1 + sigma^2),

and the network is seen through a denoiser D(x, sigma) ~ E[x_0 | x]. :class:`Denoiser` is the single
place that maps sigma to (x_t, t) for the network ``model(x_t, t, **cond)`` and converts its prediction to
x_0; all sigma arithmetic is float64.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..core.process import check_prediction, to_x0_eps
from ..core.schedules import NoiseSchedule

F64 = torch.float64


def work_dtype(device: torch.device) -> torch.dtype:
    """Samplers integrate in float64, except on Apple MPS, which has none."""
    return torch.float32 if device.type == "mps" else F64


def expand(c: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (batch,) coefficient broadcast against x."""
    c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    return c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim == 1 else c


class Denoiser:
    """D(x, sigma) -> x_0 over a network trained on a discrete :class:`NoiseSchedule`.

    For a scalar sigma: alpha_bar = 1 / (1 + sigma^2), x_t = x sqrt(alpha_bar), t = schedule.t_for_sigma(sigma)
    (fractional t between training steps, log-sigma interpolation), pred = model(x_t, t, **cond), and the
    prediction ("epsilon", "sample" or "v_prediction") is turned into x_0 by :func:`process.to_x0_eps`.
    Optional x_0 clipping to [-c, c] and dynamic thresholding (Saharia et al. 2022, Imagen: s = the
    p-quantile of |x_0| per sample, at least 1 and at most ``max_value``; x_0 <- clamp(x_0, -s, s) / s)
    are applied here, so every sampler gets them. ``nfe`` counts network evaluations.
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, prediction: str = "epsilon", cond: dict | None = None,
                 model_dtype: torch.dtype = torch.float32, clip_x0: bool | float = False,
                 dynamic_threshold: float | tuple[float, float] | None = None):
        self.model, self.schedule, self.prediction = model, schedule, check_prediction(prediction)
        self.cond, self.model_dtype, self.nfe = cond or {}, model_dtype, 0
        self.clip = 1.0 if clip_x0 is True else (float(clip_x0) if clip_x0 else None)
        if dynamic_threshold is not None:
            p, top = (dynamic_threshold, math.inf) if isinstance(dynamic_threshold, (int, float)) else dynamic_threshold
            if not 0 < p <= 1:
                raise ValueError(f"dynamic_threshold must be a quantile in (0, 1], got {p!r}")
            dynamic_threshold = (float(p), float(top))
        self.threshold = dynamic_threshold

    def predict_x0(self, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
        """x_0 from the model's own input x_t at noise level sigma (which may be +inf: SNR 0)."""
        sigma = float(sigma)
        alpha_bar = 1.0 / (1.0 + sigma * sigma) if math.isfinite(sigma) else 0.0
        if alpha_bar == 0.0 and self.prediction == "epsilon":
            raise ValueError("an epsilon-prediction model cannot predict x0 at SNR 0 (the zero-terminal-SNR end of the "
                             "schedule): use prediction='v_prediction' or 'sample' (Lin et al. 2023), or "
                             "sigmas='karras' / 'exponential', which start at a finite sigma_max")
        t = self.schedule.t_for_sigma(torch.tensor(sigma, dtype=F64))
        t = torch.full((x_t.shape[0],), float(t), dtype=torch.float32, device=x_t.device)
        pred = self.model(x_t.to(self.model_dtype), t, **self.cond).to(x_t.dtype)
        self.nfe += 1
        x0, _ = to_x0_eps(pred, self.prediction, x_t, torch.tensor(alpha_bar, dtype=x_t.dtype))
        return self.postprocess(x0)

    def postprocess(self, x0: torch.Tensor) -> torch.Tensor:
        if self.threshold is not None:
            p, top = self.threshold
            s = x0.abs().reshape(x0.shape[0], -1).quantile(p, dim=1).clamp(1.0, top)
            s = expand(s, x0)
            x0 = x0.clamp(-s, s) / s
        elif self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return x0

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """D(x, sigma) for x = x_0 + sigma eps (finite sigma)."""
        sigma = float(sigma)
        return self.predict_x0(x / math.sqrt(1.0 + sigma * sigma), sigma)


# ---------------------------------------------------------------------------------------------
# Per-sample noise

def per_sample_generators(generator, batch: int) -> list[torch.Generator]:
    """One CPU generator per sample. A list is used as given; a single generator (or None: torch's global
    RNG) draws one seed per sample, so sample i of a batch of n equals sample i of a larger batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}; pass one per sample")
        return list(generator)
    seeds = torch.randint(0, 2**62, (batch,), generator=generator)
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class Noise:
    """Standard normal noise of the sample shape, drawn per sample on the CPU from that sample's own
    generator (float32, as diffusers' ``randn_tensor`` does), so it does not depend on the batch."""

    def __init__(self, generators: Sequence[torch.Generator], shape: Sequence[int], device, dtype):
        self.generators, self.shape, self.device, self.dtype = generators, tuple(shape[1:]), device, dtype

    def __call__(self) -> torch.Tensor:
        z = torch.cat([torch.randn((1, *self.shape), generator=g, dtype=torch.float32) for g in self.generators])
        return z.to(self.device, self.dtype)


# ---------------------------------------------------------------------------------------------
# The start from pure noise

def start(denoise: Denoiser, noise: Noise, sigmas: torch.Tensor, up_fraction: float,
          callback: Callable | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial state and the sigma grid left to integrate.

    With a finite sigma_0 the prior is x = sqrt(1 + sigma_0^2) z, i.e. x_t = z ~ N(0, I), the model's own
    prior. When sigma_0 = inf (zero-terminal SNR) no sigma-space state exists, so the first step is taken
    in closed form from SNR 0, where eps = x_t exactly: x_1 = x0_hat + sqrt(sigma_1^2 - up^2) x_t + up z',
    with up = up_fraction * sigma_1 (0 for ODE samplers, the ancestral share of new noise otherwise). This
    is the DDIM / DDPM posterior step from alpha_bar = 0, and costs one network evaluation.
    """
    z = noise()
    s0 = float(sigmas[0])
    if math.isfinite(s0):
        return z * math.sqrt(1.0 + s0 * s0), sigmas
    x0 = denoise.predict_x0(z, math.inf)
    if callback is not None:
        callback(0, z, math.inf, x0)  # at sigma = inf the state passed is x_t itself
    s1 = float(sigmas[1])
    up = up_fraction * s1
    x = x0 + math.sqrt(s1 * s1 - up * up) * z
    if up > 0:
        x = x + up * noise()
    return x, sigmas[1:]


# ---------------------------------------------------------------------------------------------
# Polynomial (Adams-Bashforth) weights for the multistep samplers

def lagrange_weights(nodes: Sequence[float], a: float, b: float, exp_weight: bool = False) -> list[float]:
    """w_j = int_a^b l_j(u) du for the Lagrange basis l_j on ``nodes`` (or int_a^b l_j(u) e^u du with
    ``exp_weight``), in closed form: the antiderivative of p(u) e^u is e^u (p - p' + p'' - ...), which lets
    b be -inf (the last step to sigma = 0 when u = log sigma)."""
    from numpy.polynomial import Polynomial as P

    weights = []
    for j, nj in enumerate(nodes):
        l = P([1.0])
        for k, nk in enumerate(nodes):
            if k != j:
                l = l * P([-nk, 1.0]) / (nj - nk)
        if not exp_weight:
            F = l.integ()
            weights.append(float(F(b) - F(a)))
            continue
        G = sum(((-1) ** k * l.deriv(k) for k in range(l.degree() + 1)), P([0.0]))
        at = lambda u: 0.0 if u == -math.inf else math.exp(u) * float(G(u))  # noqa: E731
        weights.append(at(b) - at(a))
    return weights
