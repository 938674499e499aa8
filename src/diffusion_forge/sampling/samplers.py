"""Samplers: one short function per algorithm over a denoiser D(x, sigma), k-diffusion style.

Every sampler integrates from sigma_0 down to sigma_N = 0 in sigma space, x = x_0 + sigma eps
(Karras et al. 2022), where the probability-flow ODE reads

    dx / dsigma = (x - D(x, sigma)) / sigma = eps_hat(x, sigma).

Exponential integrators (DPM-Solver++, UniPC, DEIS) use lambda = -log sigma (half the log-SNR), in which the
ODE is solved exactly up to the polynomial model of D or eps_hat. The sigma grid (the model's own sigmas at
spaced timesteps, Karras', exponential) is an option of every sampler, chosen in :func:`sample`; the
samplers only see a list of sigmas. Each takes ``(D, x, sigmas, noise, callback, **options)``, calls
``D(x, sigma)`` with a Python float sigma (the denoiser broadcasts it over the batch), and returns
x at sigma = 0. The last step always lands on sigma = 0: the exponential integrators and single-step methods
take it as the data prediction itself (as k-diffusion and diffusers do); the multistep methods in sigma
(lms, ipndm, pndm) integrate their polynomial down to 0.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .utils import lagrange_weights

def _noop(*args):
    pass


def eta_at(eta: float, s: float, s_tmax: float) -> float:
    """The eta of a step that starts at sigma s: ``eta`` where s <= s_tmax, else 0, a deterministic step (the
    S_tmax bound on stochasticity of Karras et al. 2022, Algorithm 2). At a high noise level a denoiser's
    errors act on the coarse content (which digit, which layout): fresh noise there lets the sample drift with
    them, while the probability-flow ODE carries the prior's mass along (docs/samplers.md, "Noise only below
    s_tmax")."""
    return eta if s <= s_tmax else 0.0


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
def sample_euler_ancestral(D, x, sigmas, noise, callback=_noop, eta=1.0, s_noise=1.0, s_tmax=math.inf):
    """Ancestral sampling: an Euler step down to sigma_down, then fresh noise of std sigma_up brings the
    level to s_next (k-diffusion's euler_ancestral). It equals DDIM with this eta (Song et al. 2021):
    x' = x0 + sigma_down eps_hat + sigma_up z; the ``ddim`` sampler is this function with eta = 0.
    Steps that start above ``s_tmax`` are deterministic (:func:`eta_at`)."""
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        down, up = ancestral_split(s, s_next, eta_at(eta, s, s_tmax))
        x = x + (down - s) * (x - x0) / s
        if up > 0:
            x = x + s_noise * up * noise(s, s_next)
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
            x = x + math.sqrt(var) * noise(s, s_next)
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


def timestep_midpoint(D, s: float, s_next: float) -> float:
    """The sigma of F-PNDM's Runge-Kutta midpoint (Liu et al. 2022, eq. 12): the midpoint in the time the grid
    is spaced in. Between two of the schedule's own timesteps ("default" grids): t - delta/2, i.e.
    sigma((t + t') / 2) (diffusers' PNDMScheduler). On grids spaced in sigma (Karras', exponential) and for a
    bare D(x, sigma) without a ``schedule``: Karras et al.'s time sigma(t) = t, so (s + s_next) / 2 (a timestep
    midpoint there can sit far below it, 1.3 against 3.8 on 7.6 -> 0.01, and each stage then amplifies the
    previous stage's error by (s - s_mid) / s_mid)."""
    while isinstance(D, functools.partial):
        D = D.func
    schedule = getattr(D, "schedule", None)
    if schedule is None or not hasattr(schedule, "t_for_sigma"):
        return (s + s_next) / 2
    t, t_next = float(schedule.t_for_sigma(s)), float(schedule.t_for_sigma(s_next))
    if max(abs(t - round(t)), abs(t_next - round(t_next))) > 1e-6:
        return (s + s_next) / 2
    return float(schedule.sigma_at((t + t_next) / 2))


@torch.no_grad()
def sample_pndm(D, x, sigmas, noise=None, callback=_noop, euler_start=True):
    """Pseudo numerical methods (Liu et al. 2022, F-PNDM): three steps of pseudo Runge-Kutta, then pseudo
    linear multistep (PLMS: fixed 4th-order Adams-Bashforth on eps_hat). Pseudo RK is RK4 with the DDIM
    transfer phi(x, t -> t', e) = x + (sigma' - sigma) e, its stages at the midpoint t_m (:func:`timestep_midpoint`):
    x_k = phi(x, t -> t_m, e_{k-1}) for e2, e3 at t_m, x3 = phi(x, t -> t', e3), e4 = eps_hat(x3, t'), x' =
    phi(x, t -> t', (e1 + 2 e2 + 2 e3 + e4) / 6): diffusers' PNDMScheduler (skip_prk_steps=False). The last step
    is never RK. With ``euler_start`` the first step from pure noise is Euler's (see :func:`sample_heun`)."""
    ds, n, first = [], len(sigmas) - 1, int(euler_start)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        d1 = (x - x0) / s
        h = s_next - s
        if first <= i < min(first + 3, n - 1):
            s_mid = timestep_midpoint(D, s, s_next)
            x1 = x + (s_mid - s) * d1
            d2 = (x1 - D(x1, s_mid)) / s_mid
            x2 = x + (s_mid - s) * d2
            x3 = x + h * (d3 := (x2 - D(x2, s_mid)) / s_mid)
            d4 = (x3 - D(x3, s_next)) / s_next
            ds = [d1] + ds
            x = x + h * (d1 + 2 * d2 + 2 * d3 + d4) / 6
        else:
            ds = [d1] + ds[:3]
            x = x + h * sum(c * d for c, d in zip(AB_FIXED[len(ds) - 1], ds))
    return x


LOWER_ORDER_FINAL_STEPS = 15   # diffusers' lower_order_final applies to grids of fewer steps


@torch.no_grad()
def sample_deis(D, x, sigmas, noise=None, callback=_noop, order=3, lower_order_final=True):
    """DEIS (Zhang & Chen 2023, the exponential-integrator multistep "rho AB" in log rho, as in diffusers'
    logrho DEISMultistepScheduler): eps_hat is extrapolated by a polynomial in u = log sigma through the last
    ``order`` slopes (3, the paper's rhoAB3; diffusers' default solver_order is 2) and dx = eps_hat dsigma
    = eps_hat(u) e^u du is integrated exactly. The order, as diffusers' default solver options: min(order, i + 1) on step i (the history fills), and with
    ``lower_order_final`` on a grid of fewer than 15 steps first order on the last step and at most second on
    the one before; lower also after a jump in step size (MAX_STEP_RATIO; never on trailing, Karras' or
    exponential grids). A last step to sigma = 0 is first order: x = x0, the sigma_next -> 0 limit of the
    DDIM step (diffusers' DEIS ends at sigma(t = 0) instead, leaving that sigma's noise in the sample)."""
    ds, us, n = [], [], len(sigmas) - 1
    few = lower_order_final and n < LOWER_ORDER_FINAL_STEPS
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        ds, us = ([(x - x0) / s] + ds)[:order], ([math.log(s)] + us)[:order]
        if s_next == 0:  # no polynomial in log sigma reaches log 0 = -inf: first order, x = x0
            x = x0
            continue
        k = _usable_order(order, us[0] - math.log(s_next), [a - b for a, b in zip(us[1:], us[:-1])])
        k = min(k, n - i) if few else k   # 1 on the last step, <= 2 on the one before
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
def sample_dpmpp_2m_sde(D, x, sigmas, noise, callback=_noop, eta=1.0, s_noise=1.0, s_tmax=math.inf):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, sec. 5 / Gonzalez et al. 2023; k-diffusion's midpoint form):
    the exact solution of the linear part of the reverse SDE scaled by eta, x' = (s_next / s) e^(-eta h) x
    + (1 - e^(-(1+eta) h)) D_hat + s_next sqrt(1 - e^(-2 eta h)) z, with the 2M correction of D.
    eta = 0 gives the ODE solver :func:`sample_dpmpp_2m`; steps that start above ``s_tmax`` take eta = 0
    (:func:`eta_at`)."""
    x0_old, h_old = None, None
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        if s_next == 0:
            x = x0
            continue
        h = _lam(s_next) - _lam(s)
        eh = eta_at(eta, s, s_tmax) * h
        x = s_next / s * math.exp(-eh) * x - math.expm1(-h - eh) * x0
        if x0_old is not None and _usable_order(2, h, [h_old]) == 2:
            x = x - 0.5 * math.expm1(-h - eh) * (h / h_old) * (x0 - x0_old)
        if eh > 0:
            x = x + s_noise * s_next * math.sqrt(-math.expm1(-2 * eh)) * noise(s, s_next)
        x0_old, h_old = x0, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(D, x, sigmas, noise, callback=_noop, eta=1.0, s_noise=1.0, s_tmax=math.inf):
    """DPM-Solver++(3M) SDE (Lu et al. 2022b's third-order multistep, with the SDE noise of
    :func:`sample_dpmpp_2m_sde`): D is extrapolated with first and second divided differences in lambda,
    weighted by phi_2 = (e^-H - 1)/H + 1 and phi_3 = phi_2 / H - 1/2, H = (1 + eta) h. eta = 0 is DPM-Solver++(3M);
    steps that start above ``s_tmax`` take eta = 0 (:func:`eta_at`)."""
    x0s, hs = [], []
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        callback(i, x, s, x0)
        if s_next == 0:
            x = x0
            continue
        h = _lam(s_next) - _lam(s)
        e = eta_at(eta, s, s_tmax)
        H = (1 + e) * h
        x = s_next / s * math.exp(-e * h) * x - math.expm1(-H) * x0
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
        if e > 0:
            x = x + s_noise * s_next * math.sqrt(-math.expm1(-2 * e * h)) * noise(s, s_next)
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
