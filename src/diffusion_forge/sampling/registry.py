"""The sampler registry and the ONE rule that picks a sampler wherever the toolkit samples.

``SAMPLERS[name]`` is a :class:`SamplerSpec`: the function, its network evaluations for n steps (NFE), its
order and its options with their defaults. :func:`resolve_sampler` turns what a caller asked for (a name or
None, a step count, options) into what runs: None picks the default sampler for the NFE budget ``steps``
(``DEFAULT_SAMPLERS``, chosen on trained networks), options are checked against the sampler's own.

Two tables, measured two ways:

* ``DEFAULT_SAMPLERS`` (what ``sampler=None`` runs): per NFE budget, a sampler and its options chosen on
  trained networks (benchmarks/samplers_trained.py: FD-Digits of 1,000 samples of the MNIST default recipe).
  A trained network's errors are not an exact denoiser's: there, fresh noise at every step (an ancestral
  sampler) hides part of the network's error and beats every ODE solver. Two siblings, chosen the same way,
  hold the rule for samples with a condition (``CONDITIONAL_SAMPLERS``) and for a class-conditional network
  sampled like the data (``DATA_CLASS_SAMPLERS``); ``SAMPLER_TABLES`` names the three.
* ``ODE_SAMPLERS``: the most accurate deterministic sampler per budget on an exact denoiser
  (benchmarks/samplers.py, a Gaussian mixture in closed form): the accuracy of the integrators themselves,
  at data-independent options; tests/test_samplers.py re-measures it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .samplers import (sample_ddpm, sample_deis, sample_dpm_2, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                       sample_dpmpp_3m_sde, sample_euler, sample_euler_ancestral, sample_heun, sample_ipndm,
                       sample_lms, sample_pndm, sample_unipc)

__all__ = ["SamplerSpec", "SAMPLERS", "DEFAULT_SAMPLERS", "CONDITIONAL_SAMPLERS", "DATA_CLASS_SAMPLERS",
           "SAMPLER_TABLES", "ODE_SAMPLERS", "sampler_table", "default_sampler", "ode_sampler",
           "steps_for_budget", "resolve_sampler"]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its function, its network evaluations for n steps, and the options it takes with their
    defaults. ``order`` is the global order of convergence on the probability-flow ODE (with eta = 0 where
    the sampler takes eta; None for DDPM), as tests/test_samplers.py measures it on Karras' grid
    (sigma 80 -> 0.02, rho = 7, 64 / 128 / 256 steps). Some stay below the order of their formula:
    DPM-Solver++(3M) (Lu et al.'s, k-diffusion's and diffusers' coefficients alike) weights the quadratic term
    of D by 1/2 - (h - 1 + e^-h) / h^2, half the exact integral of it, so it converges at order 2;
    iPNDM's and PNDM's fixed Adams-Bashforth coefficients are 4th order only on steps equal in sigma, 2 on
    other smooth grids. UniPC's corrector keeps its warm-up at full order. Parity with diffusers and
    k-diffusion: tests/test_sampler_parity*.py."""
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


def _sde_options() -> dict:   # the stochastic samplers' eta, noise scale and top of the noisy range (eta_at)
    return {"eta": 1.0, "s_noise": 1.0, "s_tmax": math.inf}


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, _one_per_step, None, {"variance": "beta_tilde"}, stochastic=True),
    "ddim": SamplerSpec(sample_euler_ancestral, _one_per_step, 1, {"eta": 0.0, "s_noise": 1.0}),
    "euler": SamplerSpec(sample_euler, _one_per_step, 1),
    "euler_ancestral": SamplerSpec(sample_euler_ancestral, _one_per_step, 1, _sde_options(), True),
    "heun": SamplerSpec(sample_heun, _two_stage_nfe, 2, {"euler_start": True}),
    "dpm_2": SamplerSpec(sample_dpm_2, _two_stage_nfe, 2, {"euler_start": True}),
    "lms": SamplerSpec(sample_lms, _one_per_step, 4, {"order": 4}),
    "pndm": SamplerSpec(sample_pndm, _pndm_nfe, 2, {"euler_start": True}),
    "ipndm": SamplerSpec(sample_ipndm, _ipndm_nfe, 2, {"afs": False, "free_last_step": False}),
    "deis": SamplerSpec(sample_deis, _one_per_step, 3, {"order": 3, "lower_order_final": True}),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, _one_per_step, 2),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, _one_per_step, 2, _sde_options(), True),
    "dpmpp_3m_sde": SamplerSpec(sample_dpmpp_3m_sde, _one_per_step, 2, _sde_options(), True),
    "unipc": SamplerSpec(sample_unipc, _one_per_step, 3, {"order": 2, "variant": "bh2"}),
}

# What sampler=None runs for an NFE budget (the largest key <= it): (name, options), on the default grid
# (sigmas="default", spacing="trailing"), chosen on trained networks by benchmarks/samplers_trained.py and the
# screens of docs/samplers.md ("On trained networks", "A larger eta"): FD-Digits@1k of the MNIST default recipe
# trained for 10 minutes. DPM-Solver++(2M) SDE with eta well above 1 keeps e^(-eta h) of the state's own noise
# per step and draws the rest fresh, nearly "denoise, then re-noise", so a trained network's errors do not pile
# up along the path. At 20 NFE on two such runs, eta 5: 13.0 / 11.6 and 10.5 / 8.9 (two draws of seeds), against
# 18.0 / 17.8 and 15.3 for euler_ancestral at eta 1.4 (the default before) and 24.8-29.6 for the ODE solvers; it
# also wins at 5 and 10 NFE. eta 4-8 are within seed noise; recall falls from eta 10. Steps that start above
# sigma 5 stay deterministic (s_tmax, EDM's bound on stochasticity): re-noising there lets the digit drift with
# the network's errors (digit shares 5.7-16% at 10 NFE, 6.2-15.3% at 20); with the ODE above sigma 5 they stay
# 7.5-14.5%, and 10 NFE falls from 14.0 / 18.7 to 9.7 / 12.4 on the same two runs, 20 NFE from 10.5 / 13.0 to
# 8.7 / 11.5 (docs/samplers.md, "Noise only below s_tmax"). On a third run, trained after that choice: 19.4 /
# 11.3 / 8.6 at 5 / 10 / 20 NFE against 24.8 / 14.9 / 10.2 without s_tmax (the best at up to 250 NFE: 7.9).
DEFAULT_SAMPLERS: dict[int, tuple[str, dict]] = {
    1: ("dpmpp_2m_sde", {"eta": 5.0, "s_tmax": 5.0}),
}

# With a condition (class labels, a prompt) the top of the path stays noisy: there the guided denoiser pulls
# towards the requested class, and re-noising lets it correct what the first steps got wrong. On the
# class-conditional recipe at CFG w = 1.25 (benchmarks/guidance.py): 99.1% of the requested digit at FD 9.3 with
# noise at every level, 98.4% at FD 7.8 with s_tmax 5 (which then needs w = 1.5 for 99%: FD 11.8).
CONDITIONAL_SAMPLERS: dict[int, tuple[str, dict]] = {
    1: ("dpmpp_2m_sde", {"eta": 5.0}),
}

# A class-conditional network sampled like the data (`--class data`: y_i ~ p(c), no guidance), so the samples
# follow p(x) = sum_c p(c) p(x | c): deterministic above sigma 3. Chosen by a rule set before the rows were run
# (docs/samplers.md, "The class-conditional recipe, sampled like the data"): on a 2,436-step 10-minute run, FD-Digits
# at 10 / 20 NFE on three blocks of 1,000 seeds 7.25 / 6.58, 5.17 / 5.23, 5.07 / 4.70 against 7.40 / 6.83,
# 6.17 / 5.96, 5.39 / 5.74 with s_tmax 5, and recall 0.87-0.90 against 0.82-0.86; on a 2,800-step run 6.77 / 6.42
# and 4.95 / 5.41 against 6.77 / 6.64 and 6.55 / 6.21 (two blocks). At 250 NFE, the one budget measured above 20,
# s_tmax 5 was ahead (6.26 against 7.04), so from 250 NFE on the table keeps it.
DATA_CLASS_SAMPLERS: dict[int, tuple[str, dict]] = {
    1: ("dpmpp_2m_sde", {"eta": 5.0, "s_tmax": 3.0}),
    250: ("dpmpp_2m_sde", {"eta": 5.0, "s_tmax": 5.0}),
}

# Which table the rule reads, by what the samples are: no condition; a condition to meet (class labels, a prompt,
# guided or not); or classes drawn from the training set's shares p(c) and sampled unguided (they follow the data).
# Names, not the dicts, so that a table replaced on the module is the one read.
SAMPLER_TABLES: dict[str, str] = {
    "unconditional": "DEFAULT_SAMPLERS", "conditional": "CONDITIONAL_SAMPLERS", "data": "DATA_CLASS_SAMPLERS",
}

# The most accurate deterministic sampler for an NFE budget on the default grid on an exact denoiser, as
# benchmarks/samplers.py measures it (tests/test_samplers.py re-measures it); a budget uses the largest key <= it.
ODE_SAMPLERS: dict[int, str] = {1: "ipndm", 5: "ipndm", 10: "ipndm", 20: "ipndm", 50: "lms"}


def _check_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _for_budget(table: dict, budget: int):
    budget = _check_steps(budget)
    return table[max(k for k in table if k <= budget)]


def sampler_table(samples: str) -> dict[int, tuple[str, dict]]:
    """The table ``SAMPLER_TABLES`` names for ``samples`` ("unconditional", "conditional" or "data")."""
    if samples not in SAMPLER_TABLES:
        raise ValueError(f"samples must be one of {', '.join(SAMPLER_TABLES)}, got {samples!r}")
    return globals()[SAMPLER_TABLES[samples]]


def default_sampler(budget: int, samples: str = "unconditional") -> tuple[str, dict]:
    """(name, options) picked when no sampler is named, for an NFE budget: the largest key <= it of the table
    for ``samples`` (DEFAULT_SAMPLERS, CONDITIONAL_SAMPLERS where the samples have a condition, DATA_CLASS_SAMPLERS
    where the classes are drawn from p(c) and sampled unguided); the options are a copy."""
    name, options = _for_budget(sampler_table(samples), budget)
    return name, dict(options)


def ode_sampler(budget: int) -> str:
    """The most accurate deterministic sampler on an exact denoiser for an NFE budget (ODE_SAMPLERS)."""
    return _for_budget(ODE_SAMPLERS, budget)


def steps_for_budget(sampler: str, budget: int) -> int:
    """The largest step count of ``sampler`` whose NFE fits in ``budget``."""
    return _check_sampler(sampler).steps_for(_check_steps(budget))


def _same_kind(value, default) -> bool:
    """bool for a bool option, an integer for an int, a number for a float, a string for a string."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, np.integer)):
        return isinstance(value, (int, np.integer))
    if isinstance(default, float):
        return isinstance(value, (int, float, np.integer, np.floating))
    return isinstance(value, type(default))


def resolve_sampler(sampler: str | None, steps: int, options: dict | None = None,
                    samples: str = "unconditional") -> tuple[str, int, dict]:
    """(name, steps, options) to run, from what was asked: the one rule every caller uses.

    sampler None: the sampler of :func:`default_sampler` for the NFE budget ``steps`` and what the ``samples``
    are ("unconditional"; "conditional": drawn with a condition, class labels or a prompt; "data": classes
    drawn from the training set's shares p(c), unguided), with its options under
    the ones given, at the largest step count whose NFE fits it (at least 1). ``options`` (None values are
    dropped) are checked against the sampler's own, by name and kind, and returned merged over its defaults."""
    steps = _check_steps(steps)
    given = {k: v for k, v in (options or {}).items() if v is not None}
    if sampler is None:
        sampler, chosen = default_sampler(steps, samples)
        given = {**chosen, **given}
        spec = SAMPLERS[sampler]
        steps = max(1, spec.steps_for(steps, **{k: v for k, v in given.items() if k in spec.options}))
    spec = _check_sampler(sampler)
    for key, value in given.items():
        if key not in spec.options:
            known = ", ".join(f"{k} (default {v!r})" for k, v in spec.options.items()) or "none"
            raise ValueError(f"sampler {sampler!r} takes no option {key!r}; its options: {known}")
        if not _same_kind(value, spec.options[key]):
            default, kind = spec.options[key], type(spec.options[key]).__name__
            raise ValueError(f"sampler option {key}={value!r} of {sampler!r} must be {'an' if kind == 'int' else 'a'} "
                             f"{kind} (default {default!r})")
    return sampler, steps, {**spec.options, **given}
