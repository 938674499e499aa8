"""Samplers: one short function per algorithm over a denoiser D(x, sigma), k-diffusion style.

Every sampler integrates from sigma_0 down to sigma_N = 0 in sigma space, x = x_0 + sigma eps
(Karras et al. 2022), where the probability-flow ODE reads

    dx / dsigma = (x - D(x, sigma)) / sigma = eps_hat(x, sigma).

Exponential integrators (DPM-Solver++, UniPC, DEIS) use lambda = -log sigma (half the log-SNR), in which the
ODE is solved exactly up to the polynomial model of D or eps_hat. The sigma grid (the model's own sigmas at
spaced timesteps, Karras', exponential) is an option of every sampler, chosen in :func:`sample`; the
samplers only see a list of sigmas. Each takes ``(D, x, sigmas, noise, callback, **options)`` and returns
x at sigma = 0. The last step always lands on sigma = 0: the exponential integrators and single-step methods
take it as the data prediction itself (as k-diffusion and diffusers do); the multistep methods in sigma
(lms, ipndm, pndm) integrate their polynomial down to 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..core.process import check_prediction
from .utils import Denoiser, Noise, lagrange_weights, per_sample_generators, start, work_dtype
from ..core.schedules import NoiseSchedule, SIGMA_GRIDS, SPACINGS

__all__ = ["sample", "SAMPLERS", "DEFAULT_SAMPLERS", "default_sampler", "steps_for_budget"]


def _noop(*args):
    pass


def ancestral_split(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) for a step s -> s_next that re-injects fresh noise of std sigma_up:
    sigma_up = eta * s_next * sqrt(1 - s_next^2 / s^2) is DDIM's sigma_eta (Song et al. 2021, eq. 16) in
    sigma space; eta = 1 is the DDPM posterior, eta = 0 the deterministic DDIM / Euler step."""
    if s_next == 0:
        return 0.0, 0.0
    up = min(s_next, eta * s_next * math.sqrt(max(0.0, 1 - s_next**2 / s**2)))
    return math.sqrt(s_next**2 - up**2), up


# Variable-step multistep formulas are accurate (and two-step ones zero-stable: Grigorieff 1983) only while a
# step is at most 1 + sqrt(2) times the one before. The data end of "leading" / "linspace" grids jumps 3-5x
# in lambda into t = 0, where extrapolating D from the short history overshoots; such a step uses the order
# whose history it can trust. Grids of "trailing", Karras' and exponential sigmas stay below the bound.
MAX_STEP_RATIO = 1 + math.sqrt(2)


def _usable_order(order: int, h: float, past: list[float]) -> int:
    """The highest order <= ``order`` whose history steps (``past``, newest first) grow by at most
    MAX_STEP_RATIO into the step h (the order is 1 without history)."""
    k, newer = 1, h
    for older in past[: order - 1]:
        if newer > MAX_STEP_RATIO * older:
            break
        k, newer = k + 1, older
    return k


# ---------------------------------------------------------------------------------------------
# Single-step samplers

@torch.no_grad()
def sample_euler(D, x, sigmas, noise=None, callback=_noop):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without the correction).
    In sigma space this is exactly deterministic DDIM (Song et al. 2021; Karras et al. 2022, sec. 4)."""
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        x = x + (s_next - s) * (x - x0) / s
    return x


@torch.no_grad()
def sample_euler_ancestral(D, x, sigmas, noise, callback=_noop, eta=1.0, s_noise=1.0):
    """Ancestral sampling: an Euler step down to sigma_down, then fresh noise of std sigma_up brings the
    level to s_next (k-diffusion's euler_ancestral). It equals DDIM with this eta (Song et al. 2021):
    x' = x0 + sigma_down eps_hat + sigma_up z; the ``ddim`` sampler is this function with eta = 0."""
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        down, up = ancestral_split(s, s_next, eta)
        x = x + (down - s) * (x - x0) / s
        if up > 0:
            x = x + s_noise * up * noise()
    return x


@torch.no_grad()
def sample_ddpm(D, x, sigmas, noise, callback=_noop, variance="beta_tilde"):
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, Algorithm 2), over
    any grid of jumps t -> s. In sigma space its mean is x0 + (s^2 / t) eps_hat; its variance is
    beta_tilde: s^2 (t^2 - s^2) / t^2 (the true posterior), or "beta": (t^2 - s^2)(1 + s^2) / (1 + t^2)
    (the jump's forward variance, DDPM's "fixed_large")."""
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"unknown variance {variance!r}; choose one of: beta_tilde, beta")
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        x = x0 + s_next**2 / s * (x - x0) / s
        if s_next > 0:
            var = s_next**2 * (s**2 - s_next**2) / s**2 if variance == "beta_tilde" else \
                (s**2 - s_next**2) * (1 + s_next**2) / (1 + s**2)
            x = x + math.sqrt(var) * noise()
    return x


@torch.no_grad()
def sample_heun(D, x, sigmas, noise=None, callback=_noop, euler_start=True):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, no churn); Euler on the last step to 0.

    With ``euler_start`` the first step, from pure noise, is an Euler (DDIM) step: there the slope is nearly
    constant in sigma and the trapezoid rule, which weights the slope at sigma_1 by half of a step that
    may be 1000 times longer (the cosine schedule's sigma_max is 2e4), is badly wrong (diffusers' Heun gives
    FD 18 on a cosine-schedule Gaussian mixture at 10 steps). ``euler_start=False`` is Algorithm 1 exactly."""
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        d = (x - x0) / s
        x_euler = x + (s_next - s) * d
        if s_next == 0 or (i == 0 and euler_start):
            x = x_euler
        else:
            d_next = (x_euler - D(x_euler, s_next)) / s_next
            x = x + (s_next - s) * (d + d_next) / 2
    return x


@torch.no_grad()
def sample_dpm_2(D, x, sigmas, noise=None, callback=_noop, euler_start=True):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1, in k-diffusion's sigma form): an Euler half step to the
    log-midpoint sigma_mid = sqrt(s s_next), then the full step with the midpoint slope; Euler on the last
    step and, with ``euler_start``, on the first (as :func:`sample_heun`)."""
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        d = (x - x0) / s
        if s_next == 0 or (i == 0 and euler_start):
            x = x + (s_next - s) * d
        else:
            s_mid = math.sqrt(s * s_next)
            x_mid = x + (s_mid - s) * d
            x = x + (s_next - s) * (x_mid - D(x_mid, s_mid)) / s_mid
    return x


# ---------------------------------------------------------------------------------------------
# Linear multistep samplers on eps_hat = (x - D) / sigma

AB_FIXED = [[1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]


@torch.no_grad()
def sample_lms(D, x, sigmas, noise=None, callback=_noop, order=4):
    """Linear multistep (Adams-Bashforth) in sigma (Karras et al. 2022's LMS in k-diffusion): eps_hat is
    extrapolated by the Lagrange polynomial through the last ``order`` slopes and integrated exactly over
    [s, s_next]; lower order while the history fills."""
    ds = []
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        ds = [(x - x0) / s] + ds[: order - 1]
        w = lagrange_weights([sigmas[i - k] for k in range(len(ds))], s, s_next)
        x = x + sum(wj * dj for wj, dj in zip(w, ds))
    return x


@torch.no_grad()
def sample_ipndm(D, x, sigmas, noise=None, callback=_noop, afs=False, free_last_step=False):
    """Improved PNDM (Zhang & Chen 2023, DEIS paper, iPNDM): the DDIM (Euler) transfer with eps_hat replaced
    by the fixed 4th-order Adams-Bashforth combination of the last four slopes (lower order at the start).
    Fixed coefficients assume steps equal in sigma; :func:`sample_lms` is its variable-step relative.

    Two options save an evaluation at either end of the grid, where it buys almost nothing:

    - ``afs``: an analytical first step (after Zhou et al. 2024, "Fast ODE-based sampling for diffusion
      models in around 5 steps", sec. 3.3): at the first sigma, pure noise (alpha_bar = 4e-5 at the end of
      DDPM's linear schedule), the denoiser is taken as its limit E[x0], assumed 0 (zero-mean data, as
      [-1, 1] images roughly are), so the slope is x / sigma, instead of asking the network. The error is
      that of the prior x_t = z itself, which neglects the same sqrt(alpha_bar) E[x0]; the probability-flow
      ODE then shrinks it by about data std / sigma_1. Not for a zero-terminal-SNR start (there the closed-form
      step from SNR 0 takes the first step, with its evaluation).
    - ``free_last_step``: the last step, from the grid's smallest sigma to 0, reuses the newest slope instead
      of a new evaluation: it moves x by sigma_min eps_hat (sigma_min = 0.01 on DDPM's linear schedule), so
      the slope's change over that step costs sigma_min times as much in x. Only for grids that end at the
      schedule's sigma_min ("karras", "exponential", "linspace" spacing); on "trailing" the last sigma is
      that of t = T/n - 1, where the slope still changes (benchmarks/samplers.py shows it).

    Each saves one evaluation (``SAMPLERS["ipndm"].nfe``), which the grid spends on one more step."""
    ds = []
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if afs and i == 0 and s_next > 0:
            d = x / s
        elif free_last_step and s_next == 0 and ds:
            d = ds[0]
        else:
            d = (x - D(x, s)) / s
        callback(i, x, s, x - s * d)
        ds = [d] + ds[:3]
        x = x + (s_next - s) * sum(c * dj for c, dj in zip(AB_FIXED[len(ds) - 1], ds))
    return x


@torch.no_grad()
def sample_pndm(D, x, sigmas, noise=None, callback=_noop, euler_start=True):
    """Pseudo numerical methods (Liu et al. 2022, F-PNDM): three steps of pseudo Runge-Kutta (classical RK4
    with the DDIM transfer, which in sigma space is an Euler step; 4 evaluations each), then pseudo linear
    multistep (PLMS: fixed 4th-order Adams-Bashforth on eps_hat). The last step is never RK. With
    ``euler_start`` the first step from pure noise is an Euler step (see :func:`sample_heun`)."""
    ds, n, first = [], len(sigmas) - 1, int(euler_start)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        d1 = (x - x0) / s
        h = s_next - s
        if first <= i < min(first + 3, n - 1):
            s_mid = s + h / 2
            d2 = (x + h / 2 * d1 - D(x + h / 2 * d1, s_mid)) / s_mid
            d3 = (x + h / 2 * d2 - D(x + h / 2 * d2, s_mid)) / s_mid
            d4 = (x + h * d3 - D(x + h * d3, s_next)) / s_next
            ds = [d1] + ds
            x = x + h * (d1 + 2 * d2 + 2 * d3 + d4) / 6
        else:
            ds = [d1] + ds[:3]
            x = x + h * sum(c * d for c, d in zip(AB_FIXED[len(ds) - 1], ds))
    return x


@torch.no_grad()
def sample_deis(D, x, sigmas, noise=None, callback=_noop, order=3):
    """DEIS (Zhang & Chen 2023, the exponential-integrator multistep "rho AB" in log rho, as in diffusers'
    logrho DEIS): eps_hat is extrapolated by a polynomial in u = log sigma through the last ``order`` slopes
    and dx = eps_hat dsigma = eps_hat(u) e^u du is integrated exactly. Lower order while the history fills
    or after a jump in step size (MAX_STEP_RATIO); first order (x = x0) on the last step to sigma = 0."""
    ds, us = [], []
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        ds, us = ([(x - x0) / s] + ds)[:order], ([math.log(s)] + us)[:order]
        if s_next == 0:  # no polynomial in log sigma reaches log 0 = -inf: first order, x = x0
            x = x0
            continue
        k = _usable_order(order, us[0] - math.log(s_next), [a - b for a, b in zip(us[1:], us[:-1])])
        w = lagrange_weights(us[:k], us[0], math.log(s_next), exp_weight=True)
        x = x + sum(wj * dj for wj, dj in zip(w, ds))
    return x


# ---------------------------------------------------------------------------------------------
# Exponential integrators on the data prediction, in lambda = -log sigma

def _lam(s: float) -> float:
    return -math.log(s) if s > 0 else math.inf


@torch.no_grad()
def sample_dpmpp_2m(D, x, sigmas, noise=None, callback=_noop):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): with h = lambda_next - lambda,
    x' = (s_next / s) x + (1 - e^-h) D_hat, D_hat = (1 + 1/2r) D_i - 1/2r D_{i-1}, r = h_{i-1} / h.
    First order on the first step, on the last step to sigma = 0, and after a jump in step size
    (see MAX_STEP_RATIO)."""
    x0_old, h_old = None, None
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        h = _lam(s_next) - _lam(s)
        x0_hat = x0
        if x0_old is not None and s_next > 0 and _usable_order(2, h, [h_old]) == 2:
            r = h_old / h
            x0_hat = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_old
        x = s_next / s * x - math.expm1(-h) * x0_hat
        x0_old, h_old = x0, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(D, x, sigmas, noise, callback=_noop, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, sec. 5 / Gonzalez et al. 2023; k-diffusion's midpoint form):
    the exact solution of the linear part of the reverse SDE scaled by eta, x' = (s_next / s) e^(-eta h) x
    + (1 - e^(-(1+eta) h)) D_hat + s_next sqrt(1 - e^(-2 eta h)) z, with the 2M correction of D.
    eta = 0 gives the ODE solver :func:`sample_dpmpp_2m`."""
    x0_old, h_old = None, None
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        if s_next == 0:
            x = x0
            continue
        h = _lam(s_next) - _lam(s)
        eh = eta * h
        x = s_next / s * math.exp(-eh) * x - math.expm1(-h - eh) * x0
        if x0_old is not None and _usable_order(2, h, [h_old]) == 2:
            x = x - 0.5 * math.expm1(-h - eh) * (h / h_old) * (x0 - x0_old)
        if eta > 0:
            x = x + s_noise * s_next * math.sqrt(-math.expm1(-2 * eh)) * noise()
        x0_old, h_old = x0, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(D, x, sigmas, noise, callback=_noop, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE (Lu et al. 2022b's third-order multistep, with the SDE noise of
    :func:`sample_dpmpp_2m_sde`): D is extrapolated with first and second divided differences in lambda,
    weighted by phi_2 = (e^-H - 1)/H + 1 and phi_3 = phi_2 / H - 1/2, H = (1 + eta) h. eta = 0 is DPM-Solver++(3M)."""
    x0s, hs = [], []
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        if s_next == 0:
            x = x0
            continue
        h = _lam(s_next) - _lam(s)
        H = (1 + eta) * h
        x = s_next / s * math.exp(-eta * h) * x - math.expm1(-H) * x0
        phi2 = math.expm1(-H) / H + 1
        k = _usable_order(3, h, hs)
        if k == 3:
            r0, r1 = hs[0] / h, hs[1] / h
            d1_0, d1_1 = (x0 - x0s[0]) / r0, (x0s[0] - x0s[1]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi2 * d1 - (phi2 / H - 0.5) * d2
        elif k == 2:
            x = x + phi2 * (x0 - x0s[0]) / (hs[0] / h)
        if eta > 0:
            x = x + s_noise * s_next * math.sqrt(-math.expm1(-2 * eta * h)) * noise()
        x0s, hs = [x0] + x0s[:1], [h] + hs[:1]
    return x


def _unipc_update(x, s, s_next, lams, x0s, variant, x0_new=None):
    """One UniP predictor step (x0_new None) or UniC corrector step (Zhao et al. 2023, Algorithms 1-2, data
    prediction): x' = (s_next/s) x + (1 - e^-h) m_0 - B(h) sum_k rho_k D1_k with D1_k = (m_k - m_0) / r_k,
    r_k = (lambda_k - lambda_0) / h, and rho solving the order conditions R rho = g (B(h) = h for bh1,
    e^h - 1 for bh2). ``lams``/``x0s`` hold the history, newest first (m_0 at s)."""
    h = _lam(s_next) - _lam(s)
    base = s_next / s * x - math.expm1(-h) * x0s[0]
    p = len(x0s)
    if x0_new is None and p == 1:
        return base
    rks = [(lk - lams[0]) / h for lk in lams[1:]] + [1.0]
    D1s = [(mk - x0s[0]) / rk for mk, rk in zip(x0s[1:], rks)]
    hh = -h
    B = hh if variant == "bh1" else math.expm1(hh)
    phi, fact, g = math.expm1(hh) / hh - 1, 1.0, []
    for k in range(1, p + 1):
        g.append(phi * fact / B)
        fact *= k + 1
        phi = phi / hh - 1 / fact
    R = np.array([[r ** k for r in rks] for k in range(p)])
    if x0_new is None:  # predictor: order p uses the p - 1 history differences
        rho = [0.5] if p == 2 else np.linalg.solve(R[:-1, :-1], g[:-1])
        return base - B * sum(r * d for r, d in zip(rho, D1s))
    rho = [0.5] if p == 1 else np.linalg.solve(R, g)
    return base - B * (sum(r * d for r, d in zip(rho[:-1], D1s)) + rho[-1] * (x0_new - x0s[0]))


@torch.no_grad()
def sample_unipc(D, x, sigmas, noise=None, callback=_noop, order=2, variant="bh2"):
    """UniPC (Zhao et al. 2023): the UniP-``order`` multistep predictor on the data prediction, then the UniC
    corrector, which reuses the next evaluation to raise the accuracy to order + 1 at no extra NFE. Lower
    order while the history fills or after a jump in step size (MAX_STEP_RATIO); the last step to
    sigma = 0 is first order (it lands on the data prediction) and has no corrector, as in the paper's code."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; choose one of: bh1, bh2")
    lams, x0s = [], []
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        if i > 0:  # UniC: correct the previous step with the evaluation at its end
            x = _unipc_update(x_prev, sigmas[i - 1], s, lams[:p], x0s[:p], variant, x0_new=x0)
        callback(i, x, s, x0)
        lams, x0s = [_lam(s)] + lams[: order - 1], [x0] + x0s[: order - 1]
        h = _lam(s_next) - lams[0]
        p = 1 if s_next == 0 else _usable_order(order, h, [a - b for a, b in zip(lams[:-1], lams[1:])])
        x_prev, x = x, _unipc_update(x, s, s_next, lams[:p], x0s[:p], variant)
    return x


# ---------------------------------------------------------------------------------------------
# The registry

@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its function, its network evaluations for n steps, and the options it takes with their
    defaults. ``order`` is the global order of convergence on the probability-flow ODE (with eta = 0 where
    the sampler takes eta; None for DDPM), as tests/test_samplers.py measures it on Karras' grid
    (sigma 80 -> 0.02, rho = 7, 64 / 128 / 256 steps). Multistep methods warm up with lower-order steps
    (no extra NFE), which caps some below the order of their formula: DPM-Solver++(3M)'s first-order first
    step makes it 2; iPNDM's and PNDM's fixed Adams-Bashforth coefficients are 4th order only on steps
    equal in sigma, 2 on other smooth grids. UniPC's corrector keeps its warm-up at full order."""
    fn: Callable
    nfe_formula: Callable[[int, dict], int]
    order: int | None
    options: dict = field(default_factory=dict)
    stochastic: bool = False

    def nfe(self, steps: int, **options) -> int:
        """Network evaluations for ``steps`` steps with these options (on every grid: at a sigma = inf start
        the closed-form step from SNR 0 stands in for the first step)."""
        return self.nfe_formula(steps, {**self.options, **options})

    def steps_for(self, budget: int, **options) -> int:
        """The largest step count whose NFE fits in ``budget`` (0 if none)."""
        n = 0
        while self.nfe(n + 1, **options) <= budget:
            n += 1
        return n


def _one_per_step(n, o):
    return n


def _two_stage_nfe(n, o):  # two evaluations a step, one on the last (and on the first with euler_start)
    return 2 * n - 1 - (1 if o["euler_start"] and n > 1 else 0)


def _ipndm_nfe(n, o):  # the free first and last steps need a step after / before them
    return n - (n > 1) * (int(o["afs"]) + int(o["free_last_step"]))


def _pndm_nfe(n, o):  # four evaluations on each Runge-Kutta step
    first = int(o["euler_start"])
    return n + 3 * max(0, min(first + 3, n - 1) - first)


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, _one_per_step, None, {"variance": "beta_tilde"}, stochastic=True),
    "ddim": SamplerSpec(sample_euler_ancestral, _one_per_step, 1, {"eta": 0.0, "s_noise": 1.0}),
    "euler": SamplerSpec(sample_euler, _one_per_step, 1),
    "euler_ancestral": SamplerSpec(sample_euler_ancestral, _one_per_step, 1, {"eta": 1.0, "s_noise": 1.0}, True),
    "heun": SamplerSpec(sample_heun, _two_stage_nfe, 2, {"euler_start": True}),
    "dpm_2": SamplerSpec(sample_dpm_2, _two_stage_nfe, 2, {"euler_start": True}),
    "lms": SamplerSpec(sample_lms, _one_per_step, 4, {"order": 4}),
    "pndm": SamplerSpec(sample_pndm, _pndm_nfe, 2, {"euler_start": True}),
    "ipndm": SamplerSpec(sample_ipndm, _ipndm_nfe, 2, {"afs": False, "free_last_step": False}),
    "deis": SamplerSpec(sample_deis, _one_per_step, 3, {"order": 3}),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, _one_per_step, 2),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, _one_per_step, 2, {"eta": 1.0, "s_noise": 1.0}, True),
    "dpmpp_3m_sde": SamplerSpec(sample_dpmpp_3m_sde, _one_per_step, 2, {"eta": 1.0, "s_noise": 1.0}, True),
    "unipc": SamplerSpec(sample_unipc, _one_per_step, 3, {"order": 2, "variant": "bh2"}),
}

# The most accurate sampler for an NFE budget on the default grid (sigmas="default", spacing="trailing"), as
# benchmarks/samplers.py measures it (tests/test_samplers.py re-measures it); a budget uses the largest key <= it.
DEFAULT_SAMPLERS: dict[int, str] = {1: "ipndm", 5: "ipndm", 10: "ipndm", 20: "ipndm", 50: "lms"}


def _check_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def default_sampler(budget: int) -> str:
    """The sampler :func:`sample` picks when none is named, for an NFE budget."""
    budget = _check_steps(budget)
    return DEFAULT_SAMPLERS[max(k for k in DEFAULT_SAMPLERS if k <= budget)]


def steps_for_budget(sampler: str, budget: int) -> int:
    """The largest step count of ``sampler`` whose NFE fits in ``budget``."""
    return _check_sampler(sampler).steps_for(_check_steps(budget))


# ---------------------------------------------------------------------------------------------
# The entry point

def _model_device_dtype(model, device, dtype):
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = dtype or (param.dtype if param is not None and param.is_floating_point() else torch.float32)
    return device, dtype


@torch.no_grad()
def sample(model: Callable, schedule: NoiseSchedule, shape, sampler: str | None = None, steps: int = 20,
           prediction: str = "epsilon", generator=None, sigmas: str = "default", spacing: str = "trailing",
           callback: Callable | None = None, clip_x0: bool | float = False,
           dynamic_threshold: float | tuple[float, float] | None = None, eta: float | None = None,
           s_noise: float | None = None, sampler_options: dict | None = None, scheduler=None,
           device=None, dtype: torch.dtype | None = None, **cond) -> torch.Tensor:
    """Draw ``shape[0]`` samples from ``model(x_t, t, **cond)`` trained on ``schedule``.

    sampler: a name from ``SAMPLERS`` (``steps`` is then its number of steps), or None for the most accurate
        sampler whose network evaluations fit in ``steps`` (``steps`` is then the NFE budget; see
        :func:`default_sampler`).
    sigmas, spacing: the grid, an option of every sampler: "default" (the model's own sigmas at timesteps
        spaced "leading", "trailing" or "linspace", as diffusers does), "karras" or "exponential" (between
        the schedule's sigma_min and sigma_max; spacing is then unused). The default spacing is "trailing",
        which starts at the last training step (pure noise) for every step count (Lin et al. 2023).
    prediction: what the model predicts: "epsilon", "sample" or "v_prediction".
    generator: a CPU ``torch.Generator`` or a list with one per sample; the noise of sample i comes from its
        own generator, so a seed gives the same sample whatever else is in the batch.
    callback: called at every step with a dict of ``step``, ``x_t`` (the model's input), ``t`` (float
        timestep), ``sigma`` and ``x0`` (the clean-data prediction).
    clip_x0: clamp the x0 prediction to [-1, 1] (or [-c, c] for a number c). dynamic_threshold: Imagen's
        quantile p (or (p, max_value)).
    eta, s_noise, sampler_options: options of the samplers that take them (``SAMPLERS[name].options``).
    scheduler: a diffusers scheduler instance instead of ``sampler``: runs its own loop (see interop.py).
    Returns a tensor of ``shape`` in ``dtype`` (default: the model's parameter dtype, else float32).
    """
    check_prediction(prediction)
    shape = tuple(int(v) for v in shape)
    if scheduler is not None:
        if sampler is not None:
            raise ValueError("pass either sampler= or scheduler=, not both")
        from ..interop.schedulers import sample_with_scheduler
        return sample_with_scheduler(model, scheduler, shape, steps=steps, prediction=prediction,
                                     generator=generator, callback=callback, device=device, dtype=dtype, **cond)
    steps = _check_steps(steps)
    if sampler is None:
        sampler = default_sampler(steps)
        steps = max(1, SAMPLERS[sampler].steps_for(steps, **(sampler_options or {})))
    spec = _check_sampler(sampler)
    options = dict(spec.options)
    for key, value in {"eta": eta, "s_noise": s_noise, **(sampler_options or {})}.items():
        if value is None:
            continue
        if key not in options:
            raise ValueError(f"sampler {sampler!r} takes no option {key!r}; its options: "
                             f"{', '.join(options) or 'none'}")
        options[key] = value
    if sigmas not in SIGMA_GRIDS:
        raise ValueError(f"unknown sigmas {sigmas!r}; choose one of: {', '.join(SIGMA_GRIDS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    grid = schedule.sigma_grid(steps, sigmas, spacing)

    device, dtype = _model_device_dtype(model, device, dtype)
    D = Denoiser(model, schedule, prediction, cond, dtype, clip_x0, dynamic_threshold)
    noise = Noise(per_sample_generators(generator, shape[0]), shape, device, work_dtype(device))
    offset = 0

    def report(i, x, sigma, x0):
        x_t = x if math.isinf(sigma) else x / math.sqrt(1 + sigma * sigma)
        callback({"step": i + offset, "x_t": x_t.to(dtype), "t": float(schedule.t_for_sigma(sigma)),
                  "sigma": sigma, "x0": x0.to(dtype)})

    cb = report if callback is not None else _noop
    up_fraction = min(1.0, options.get("eta", 1.0 if spec.stochastic else 0.0))  # new noise from SNR 0
    x, grid = start(D, noise, grid, up_fraction, cb)
    offset = steps + 1 - len(grid)
    if offset and "euler_start" in options:  # the step from SNR 0 was that first-order first step
        options["euler_start"] = False
    if offset and "afs" in options:  # ... and it took the first step from pure noise, with its evaluation
        options["afs"] = False
    x = spec.fn(D, x, grid.tolist(), noise, cb, **options)
    return x.to(dtype)
