"""Sigma grids optimised from the model's own outputs: no data, only the denoiser and a batch of noise.

A deterministic sampler maps the prior draw x_T = sqrt(1 + sigma_max^2) z to a sample by integrating the
probability-flow ODE dx / dsigma = (x - D(x, sigma)) / sigma over a grid sigma_0 = sigma_max > ... >
sigma_{K-1} > sigma_K = 0. With few steps its error depends mostly on where those K - 1 free sigmas sit, and
the best place depends on the model (where D changes fastest), not on a formula. :func:`optimize_sigmas`
finds them in two stages, both measured against a *teacher*: the same ODE solved finely (DPM-Solver++(2M)
on ``teacher_steps`` log-uniform steps) from the same n noise draws.

1. Dynamic programming over a fine candidate grid, in the spirit of GITS (Chen et al. 2024, "A geometric
   perspective on optimal timesteps"): the teacher passes through candidate sigmas c_0 = sigma_max > ... >
   c_{M-1} = sigma_min with states X_i and denoised outputs D_i = D(X_i, c_i). The cost of jumping c_i ->
   c_j is the error of one DDIM (Euler) step from the teacher's own state,

       cost(i, j) = mean_b || D_i + (c_j / c_i) (X_i - D_i) - X_j ||_2     (X_j = the teacher's output at c_j = 0),

   and the K-step path c_0 -> 0 of least total cost (local errors add up along the path) is found exactly
   by dynamic programming, O(K M^2) with no further network call.
2. Refinement on the sampler that will run (optional, ``refine``): coordinate search on u_k = log sigma_k,
   k = 1 .. K-1, minimising the end-to-end error mean_b ||S(grid; x_T,b) - teacher(x_T,b)||^2 / dim of the
   sampler S itself (multistep samplers use their history, which a one-step cost cannot see). It starts
   from the better of the stage-1 grid and the exponential one, so on the batch it is never worse than
   either; each trial costs one run of the sampler (its NFE on the batch).

Everything is deterministic given ``seed``; the grid depends on the data only through the model, as GITS,
Align Your Steps (Sabour et al. 2024) and LD3 (Tong et al. 2024) do.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from ..core.schedules import exponential_sigmas
from .registry import SAMPLERS
from .samplers import sample_dpmpp_2m

__all__ = ["gits_path", "optimize_sigmas", "teacher_path"]
F64 = torch.float64


def _noop(*args):
    pass


def _bounds(D, sigma_max: float | None, sigma_min: float | None) -> tuple[float, float]:
    schedule = getattr(D, "schedule", None)
    if (sigma_max is None or sigma_min is None) and schedule is None:
        raise ValueError("this denoiser has no schedule: pass sigma_max= and sigma_min= (the grid's range)")
    hi = float(schedule.sigma_max if sigma_max is None else sigma_max)   # finite even at zero terminal SNR
    lo = float(schedule.sigma_min if sigma_min is None else sigma_min)
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={lo}, sigma_max={hi}")
    return hi, lo


@torch.no_grad()
def teacher_path(D: Callable, x: torch.Tensor, sigma_max: float, sigma_min: float, candidates: int,
                 substeps: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The fine solve: DPM-Solver++(2M) on (candidates - 1) * substeps log-uniform steps from sigma_max to
    sigma_min, then to 0. Returns (the candidate sigmas c_i, every ``substeps``-th node; the teacher's states
    X_i there; its denoised outputs D(X_i, c_i); its output at sigma = 0)."""
    fine = exponential_sigmas((candidates - 1) * substeps + 1, sigma_min, sigma_max)
    states, x0s = [], []

    def keep(i, xi, s, x0):
        if i % substeps == 0:
            states.append(xi.clone())
            x0s.append(x0.clone())
    out = sample_dpmpp_2m(D, x.clone(), fine.tolist(), None, keep)
    return fine[:-1:substeps].clone(), states, x0s, out


def gits_path(c: torch.Tensor, states: list[torch.Tensor], x0s: list[torch.Tensor], out: torch.Tensor,
              steps: int) -> torch.Tensor:
    """Stage 1: the ``steps``-step path c_0 -> 0 through the candidates of least summed DDIM-jump cost
    (module docstring), by dynamic programming. Returns steps + 1 sigmas ending with 0."""
    M = len(c)
    if steps > M:
        raise ValueError(f"{steps} steps need at least as many candidates, got {M}: raise candidates=")
    ends = states + [out]                       # node M is sigma = 0, whose state is the teacher's output
    targets = c.tolist() + [0.0]
    cost = torch.full((M + 1, M + 1), math.inf, dtype=F64)
    for i in range(M):
        for j in range(i + 1, M + 1):
            jump = x0s[i] + targets[j] / targets[i] * (states[i] - x0s[i])
            cost[i, j] = (jump - ends[j]).flatten(1).norm(dim=1).mean()
    best = torch.full((steps + 1, M + 1), math.inf, dtype=F64)
    arg = torch.zeros((steps + 1, M + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        total = best[k - 1][:, None] + cost              # (from, to)
        best[k], arg[k] = total.min(dim=0)
    path, j = [M], M
    for k in range(steps, 0, -1):
        j = int(arg[k, j])
        path.append(j)
    return torch.tensor([targets[j] for j in reversed(path)], dtype=F64)


def _check(D, sampler: str, nfe: int, shape, n: int, options: dict | None) -> tuple[int, dict, tuple]:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    spec = SAMPLERS[sampler]
    if spec.stochastic or sampler == "ddpm":
        raise ValueError(f"optimize_sigmas needs a deterministic sampler (its error against the ODE is what is "
                         f"minimised); {sampler!r} draws noise")
    options = {**spec.options, **(options or {})}
    if isinstance(nfe, bool) or not isinstance(nfe, int) or spec.steps_for(nfe, **options) < 1:
        raise ValueError(f"nfe must be an integer budget that fits at least one step of {sampler!r}, got {nfe!r}")
    shape = getattr(D, "sample_shape", None) if shape is None else shape
    if shape is None:
        raise ValueError("shape= (the shape of one sample, e.g. (1, 28, 28)) is required for this denoiser")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the batch of noise draws) must be a positive integer, got {n!r}")
    return spec.steps_for(nfe, **options), options, tuple(int(v) for v in shape)


@torch.no_grad()
def optimize_sigmas(denoiser: Callable, sampler: str = "ipndm", nfe: int = 5, shape=None, n: int = 256,
                    seed: int = 0, *, sampler_options: dict | None = None, cond: dict | None = None,
                    candidates: int = 64, teacher_steps: int = 512, refine: bool = True, max_evals: int | None = None,
                    sigma_max: float | None = None, sigma_min: float | None = None,
                    device=None) -> torch.Tensor:
    """A sigma grid for ``sampler`` at an NFE budget, optimised from the denoiser's outputs alone.

    denoiser: ``D(x, sigma, **cond) -> x0`` (a :class:`~diffusion_forge.Denoiser`, wrapped or not; a bare
        callable needs ``sigma_max`` / ``sigma_min``). sampler, nfe, sampler_options: what will run, at the
        largest step count K whose NFE fits (``SAMPLERS[sampler].steps_for``); deterministic samplers only.
    shape: the shape of ONE sample (default: the denoiser's ``sample_shape``); n: noise draws, from
        ``torch.Generator().manual_seed(seed)``. The range defaults to the schedule's [sigma_min, sigma_max],
        the first sigma being sigma_max (where the prior x_T = z is the model's own).
    candidates, teacher_steps: the stage-1 candidate grid and the teacher's step count (module docstring);
        refine, max_evals: stage 2 and its number of sampler runs on the batch (default 40 per free sigma,
        40 (K - 1)).
    Cost in network evaluations on batches of n: about teacher_steps, plus K * max_evals with refine.
    Returns K + 1 float64 sigmas, largest first, ending with 0: ``df.sample(..., sampler=sampler, steps=K,
    sigmas=grid)``.
    """
    steps, options, shape = _check(denoiser, sampler, nfe, shape, n, sampler_options)
    hi, lo = _bounds(denoiser, sigma_max, sigma_min)
    D = functools.partial(denoiser, **cond) if cond else denoiser
    g = torch.Generator().manual_seed(int(seed))
    x_T = torch.randn((n, *shape), generator=g, dtype=F64).to(device or "cpu") * math.sqrt(1 + hi * hi)
    substeps = max(1, math.ceil(teacher_steps / max(1, candidates - 1)))
    c, states, x0s, target = teacher_path(D, x_T, hi, lo, max(candidates, steps), substeps)
    grid = gits_path(c, states, x0s, target, steps)
    del states, x0s
    if not refine or steps < 2:
        return grid
    fn = SAMPLERS[sampler].fn

    def loss(g_: torch.Tensor) -> float:
        x = fn(D, x_T.clone(), g_.tolist(), None, _noop, **options)
        return float(((x - target) ** 2).mean())

    starts = [grid, exponential_sigmas(steps, lo, hi)]
    scored = [(loss(s), i) for i, s in enumerate(starts)]
    best, i0 = min(scored)
    evals = 40 * (steps - 1) if max_evals is None else max_evals
    return _coordinate_search(loss, starts[i0], best, math.log(lo), evals - len(starts))


def _coordinate_search(loss: Callable, grid: torch.Tensor, best: float, u_lo: float, evals: int,
                       delta: float = 0.5, tol: float = 0.01) -> torch.Tensor:
    """Pattern search on the interior log-sigmas u_1 .. u_{K-1} (u_0 = log sigma_max and the final 0 fixed):
    try u_k -/+ delta for each k in turn, keeping the ordering u_0 > u_1 > ... > u_{K-1} >= log sigma_min,
    and accept any improvement; halve delta after a sweep without one, stop below ``tol`` or after ``evals``
    sampler runs."""
    u = grid[:-1].log()
    margin = 1e-3

    def make(v):
        return torch.cat([v.exp(), torch.zeros(1, dtype=F64)])
    while delta >= tol and evals > 0:
        improved = False
        for k in range(1, len(u)):
            upper = float(u[k - 1]) - margin
            lower = float(u[k + 1]) + margin if k + 1 < len(u) else u_lo
            for sign in (-1.0, 1.0):
                if evals <= 0:
                    break
                trial = u.clone()
                trial[k] = min(upper, max(lower, float(u[k]) + sign * delta))
                if trial[k] == u[k]:
                    continue
                evals -= 1
                value = loss(make(trial))
                if value < best:
                    best, u, improved = value, trial, True
                    break
        if not improved:
            delta /= 2
    return make(u)
