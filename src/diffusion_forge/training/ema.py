"""Exponential moving average (EMA) of a model's weights, with warm-up.

After the k-th optimiser step (k = 1, 2, ...) every floating-point entry theta of the model's
state (parameters and floating buffers) moves the average by

    ema_k = d_k * ema_{k-1} + (1 - d_k) * theta_k,        ema_0 = theta_0 (the initial weights)
    d_k   = min(decay, (1 + k) / (10 + k))                 with warm-up (d_1 = 0.18, d_10 = 0.55, d_90 = 0.91)
    d_k   = decay                                          without

so that early, still-random weights are forgotten quickly. Integer buffers are copied. The average
is kept in float32 (whatever precision the forward pass runs in) and sampling uses it by default.

The power-function EMA of Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3.1) instead uses d_k = (1 - 1/k)^(gamma + 1). Its weight on the k-th weights after t steps
is exactly (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1): a profile proportional to tau^gamma over the whole
run, whose width relative to the run is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))        (``gamma_for_sigma_rel`` inverts it)

so the average always spans the same share of training, however long it is. The warm-up above is nearly
this family: 1 - 9 / (10 + k) against (1 - 1/k)^9, gamma = 8, sigma_rel = 0.09, until d_k reaches ``decay``
(at k = 8,990 for 0.999).

Under several processes every process holds the same weights after each optimiser step (the
gradients are averaged before it), so every process computes the same average; nothing is
communicated. Tests check both the closed form and the equality across processes.
"""
from __future__ import annotations

import copy
import functools
import math

import numpy as np
import torch
from torch import nn


def sigma_rel_for_gamma(gamma: float) -> float:
    """The relative width of the power-function profile tau^gamma: sqrt((g + 1) / ((g + 2)^2 (g + 3)))."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


@functools.lru_cache(maxsize=64)
def gamma_for_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma whose profile has this width: the largest real root of
    (g + 2)^2 (g + 3) = (g + 1) / sigma_rel^2, i.e. g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0."""
    if not 0.0 < sigma_rel < sigma_rel_for_gamma(0.0):
        raise ValueError(f"ema.sigma_rel must lie in (0, {sigma_rel_for_gamma(0.0):.4f}) (gamma > 0), got {sigma_rel}")
    inv = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def ema_decay(k: int, decay: float, warmup: bool = True, sigma_rel: float | None = None) -> float:
    """The decay d_k used for the k-th update (k >= 1); see the module docstring. With ``sigma_rel``: the
    power-function EMA, d_k = (1 - 1/k)^(gamma + 1), and ``decay`` / ``warmup`` are not used."""
    if k < 1:
        raise ValueError(f"EMA update numbers start at 1, got {k}")
    if sigma_rel is not None:
        return (1.0 - 1.0 / k) ** (gamma_for_sigma_rel(sigma_rel) + 1.0)
    return min(decay, (1 + k) / (10 + k)) if warmup else decay


class EMA:
    """An averaged copy of ``model`` (``ema.module``), updated with :meth:`update` after each step."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, sigma_rel: float | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {decay}")
        if sigma_rel is not None:
            gamma_for_sigma_rel(sigma_rel)             # checks the range
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        self.sigma_rel = None if sigma_rel is None else float(sigma_rel)
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the current weights of ``model`` (unwrapped, not a DDP wrapper) into the average.
        Returns the decay that was used."""
        self.num_updates += 1
        d = ema_decay(self.num_updates, self.decay, self.warmup, self.sigma_rel)
        live = model.state_dict()
        averages, news = [], []
        for name, avg in self.module.state_dict().items():
            new = live[name].detach()
            if avg.is_floating_point():
                averages.append(avg)
                news.append(new.to(avg.dtype))
            else:
                avg.copy_(new)
        if averages:   # one multi-tensor kernel, not one call per tensor (a ~2% faster training step on the CPU)
            torch._foreach_lerp_(averages, news, 1.0 - d)   # avg + (1 - d) (new - avg) = d avg + (1 - d) new
        return d

    # -- checkpointing: tensors go to safetensors, the counters to JSON ----------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    def meta(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "sigma_rel": self.sigma_rel,
                "num_updates": self.num_updates}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.module.load_state_dict(tensors)
        self.decay, self.warmup = float(meta["decay"]), bool(meta["warmup"])
        self.sigma_rel = meta.get("sigma_rel")                  # absent in checkpoints before it existed
        self.num_updates = int(meta["num_updates"])
