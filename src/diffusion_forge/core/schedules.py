"""Noise schedules: the single source of truth for a discrete-time diffusion process.

Indexing follows diffusers. Timestep ``t`` runs over ``0 .. T-1`` and

    alpha_t     = 1 - beta_t
    alpha_bar_t = prod_{s=0}^{t} alpha_s          (so the clean data sits "before" t = 0)
    x_t         = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    sigma_t     = sqrt((1 - alpha_bar_t) / alpha_bar_t)   (the noise level of x_t / sqrt(alpha_bar_t))
    SNR_t       = alpha_bar_t / (1 - alpha_bar_t) = 1 / sigma_t^2

Everything is computed in float64 on the CPU and cast once by whoever consumes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace")
SIGMA_GRIDS = ("default", "karras", "exponential")
# diffusers' DDPMScheduler defaults, used by every named schedule when no betas are given.
DEFAULT_BETA_START, DEFAULT_BETA_END = 1e-4, 0.02
# Where a zero-terminal-SNR schedule needs a finite largest sigma (Karras / exponential grids).
ZERO_SNR_SIGMA_MAX = 4096.0

Spacing = Literal["leading", "trailing", "linspace"]
SigmaGrid = Literal["default", "karras", "exponential"]
F64 = torch.float64


def _choice_error(param: str, value, allowed: Sequence[str]) -> ValueError:
    return ValueError(f"unknown {param} {value!r}; choose one of: {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------
# Beta schedules (each returns float64 betas of length T)

def linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Ho et al. (2020): beta_t linear from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, T, dtype=F64)


def scaled_linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Latent diffusion / Stable Diffusion: sqrt(beta_t) linear, then squared."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=F64) ** 2


def cosine_betas(T: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021): alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2), u = t / T,
    beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), clipped at max_beta (diffusers' squaredcos_cap_v2)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=F64)


def sigmoid_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """diffusers' sigmoid schedule: beta_t = sigmoid(linspace(-6, 6, T)) * (end - start) + start."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=F64)) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1: shift and scale sqrt(alpha_bar) so that its last value is 0
    (SNR_T = 0, pure noise) while its first value is kept. The last beta becomes exactly 1."""
    sqrt_ab = torch.cumprod(1 - betas.to(F64), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


# ---------------------------------------------------------------------------------------------
# Sigma grids for samplers (each returns n sigmas, largest first, then a final 0)

def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=F64)])


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Log-sigma evenly spaced from sigma_max to sigma_min, then 0."""
    s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=F64).exp()
    return torch.cat([s, torch.zeros(1, dtype=F64)])


def explicit_sigmas(values, steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """An explicit grid (a 1-D tensor, array or list), checked and returned as float64: strictly decreasing,
    within the schedule's [sigma_min, sigma_max] (inf allowed first on a zero-terminal-SNR schedule, whose
    sigma_max is inf), ending with 0 (appended when missing), and ``steps + 1`` values in all."""
    try:
        s = torch.as_tensor(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=F64)
    except (TypeError, ValueError, RuntimeError):
        s = None
    if s is None or s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"sigmas must be one of {', '.join(SIGMA_GRIDS)} or a 1-D sequence of sigmas, largest "
                         f"first (e.g. [80.0, 5.0, 0.5, 0.0]); got {values!r}")
    if s[-1] != 0:
        s = torch.cat([s, torch.zeros(1, dtype=F64)])
    body = s[:-1]
    if torch.isnan(s).any() or (body <= 0).any() or (body[1:] == math.inf).any() or (s[1:] >= s[:-1]).any():
        raise ValueError(f"sigmas must be positive and strictly decreasing, then 0; got {s.tolist()}")
    tol = 1e-6
    if (body > sigma_max * (1 + tol)).any() or (body < sigma_min * (1 - tol)).any():
        raise ValueError(f"sigmas must lie within the schedule's range [{sigma_min:.4g}, {sigma_max:.4g}] (then 0); "
                         f"got {s.tolist()}")
    if s.numel() != steps + 1:
        raise ValueError(f"sigmas hold {s.numel()} values with the final 0, but the sampler takes {steps} steps: "
                         f"pass {steps + 1} (or {steps} without the 0)")
    return s


def spaced_timesteps(T: int, n: int, spacing: Spacing = "leading", steps_offset: int = 0) -> torch.Tensor:
    """The n sampling timesteps, largest first, exactly as diffusers' DDIMScheduler.set_timesteps:

    linspace: round(linspace(0, T-1, n));   leading: (0, k, 2k, ...) + offset with k = T // n;
    trailing: round(T - i * T/n) - 1 for i = 0..n-1 (so it always starts at T - 1).

    For trailing, numpy's arange(T, 0, -T/n) sometimes yields n + 1 values, the last being -1 (e.g.
    T = 15, n = 13); diffusers keeps that out-of-range step, we keep the first n.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"steps must be an integer >= 1, got {n!r}")
    if n > T:
        raise ValueError(f"steps={n} exceeds the schedule's num_timesteps={T}; use at most {T} steps")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = (np.round(np.arange(T, 0, -T / n)) - 1)[:n]  # diffusers' arithmetic, bit for bit
    else:
        raise _choice_error("spacing", spacing, SPACINGS)
    return torch.tensor(np.array(ts, dtype=np.float64))


# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete noise schedule of T steps, held as float64 betas.

    Build it with :meth:`from_name`, :meth:`from_betas` or :meth:`from_diffusers`. All derived
    quantities are float64 tensors of shape (T,); :meth:`sigma_at` and :meth:`t_for_sigma` interpolate
    between integer timesteps linearly in log-sigma (as k-diffusion does), so fractional t works.
    """

    betas: torch.Tensor
    name: str = "custom"
    beta_start: float | None = None
    beta_end: float | None = None
    zero_terminal_snr: bool = False
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        b = torch.as_tensor(self.betas, dtype=F64).detach().cpu().reshape(-1)
        object.__setattr__(self, "betas", b)
        if b.numel() < 2:
            raise ValueError(f"betas must hold at least 2 values, got {b.numel()}")
        if not torch.isfinite(b).all():
            raise ValueError("betas must be finite")
        body = b[:-1] if self.zero_terminal_snr else b
        if (body <= 0).any() or (body >= 1).any() or not (0 < b[-1] <= 1):
            raise ValueError(
                "betas must lie in the open interval (0, 1); only a zero-terminal-SNR schedule may end "
                f"with beta = 1 (got min {b.min().item():.3g}, max {b.max().item():.3g})"
            )
        if b[-1] == 1 and not self.zero_terminal_snr:
            object.__setattr__(self, "zero_terminal_snr", True)

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_name(
        cls,
        name: str,
        num_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        """A named schedule: "linear", "scaled_linear", "cosine" (squaredcos_cap_v2) or "sigmoid".

        With no betas given, beta_start = 1e-4 and beta_end = 0.02 (diffusers' DDPMScheduler defaults);
        "cosine" takes none. ``zero_terminal_snr=True`` applies Lin et al.'s rescale."""
        if name not in SCHEDULE_NAMES:
            raise _choice_error("schedule name", name, SCHEDULE_NAMES)
        if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
        start = DEFAULT_BETA_START if beta_start is None else float(beta_start)
        end = DEFAULT_BETA_END if beta_end is None else float(beta_end)
        if name == "cosine":
            betas, start, end = cosine_betas(num_timesteps), None, None
        else:
            if not (0 < start < 1 and 0 < end < 1):
                raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {start} and {end}")
            betas = {"linear": linear_betas, "scaled_linear": scaled_linear_betas,
                     "sigmoid": sigmoid_betas}[name](num_timesteps, start, end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, name=name, beta_start=start, beta_end=end, zero_terminal_snr=zero_terminal_snr)

    @classmethod
    def from_betas(cls, betas, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """Any betas in (0, 1) (the last may be 1 for a zero-terminal-SNR schedule)."""
        return cls(torch.as_tensor(betas, dtype=F64), zero_terminal_snr=zero_terminal_snr)

    @classmethod
    def from_diffusers(cls, config) -> "NoiseSchedule":
        """The schedule a diffusers scheduler config describes (a dict or a scheduler's ``.config``)."""
        cfg = dict(config)
        T = int(cfg.get("num_train_timesteps", 1000))
        zero = bool(cfg.get("rescale_betas_zero_snr", False))
        if cfg.get("trained_betas") is not None:
            betas = torch.as_tensor(cfg["trained_betas"], dtype=F64)
            return cls(rescale_zero_terminal_snr(betas) if zero else betas, zero_terminal_snr=zero)
        names = {"linear": "linear", "scaled_linear": "scaled_linear",
                 "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
        beta_schedule = cfg.get("beta_schedule", "linear")
        if beta_schedule not in names:
            raise _choice_error("diffusers beta_schedule", beta_schedule, tuple(names))
        return cls.from_name(names[beta_schedule], T, cfg.get("beta_start", DEFAULT_BETA_START),
                             cfg.get("beta_end", DEFAULT_BETA_END), zero_terminal_snr=zero)

    def to_diffusers_config(self) -> dict:
        """Keyword arguments that make a diffusers scheduler with the same training process."""
        cfg: dict = {"num_train_timesteps": self.num_timesteps, "rescale_betas_zero_snr": self.zero_terminal_snr}
        if self.name == "cosine":
            cfg["beta_schedule"] = "squaredcos_cap_v2"
        elif self.name in SCHEDULE_NAMES:
            cfg.update(beta_schedule=self.name, beta_start=self.beta_start, beta_end=self.beta_end)
        else:  # custom betas travel as a list (before any zero-SNR rescale, which diffusers re-applies)
            cfg.update(beta_schedule="linear", trained_betas=self.betas.tolist(), rescale_betas_zero_snr=False)
        return cfg

    def to_dict(self) -> dict:
        """A JSON-able description; :meth:`from_dict` rebuilds the same schedule."""
        if self.name in SCHEDULE_NAMES:
            return {"name": self.name, "num_timesteps": self.num_timesteps, "beta_start": self.beta_start,
                    "beta_end": self.beta_end, "zero_terminal_snr": self.zero_terminal_snr}
        return {"name": "custom", "betas": self.betas.tolist(), "zero_terminal_snr": self.zero_terminal_snr}

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSchedule":
        if d.get("name", "custom") == "custom":
            return cls.from_betas(d["betas"], zero_terminal_snr=d.get("zero_terminal_snr", False))
        return cls.from_name(d["name"], d.get("num_timesteps", 1000), d.get("beta_start"), d.get("beta_end"),
                             zero_terminal_snr=d.get("zero_terminal_snr", False))

    # -- derived quantities (float64, shape (T,)) ---------------------------------------------
    def _memo(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def alphas(self) -> torch.Tensor:
        """alpha_t = 1 - beta_t."""
        return 1 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t = prod_{s<=t} alpha_s."""
        return self._memo("ab", lambda: torch.cumprod(self.alphas, 0))

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (the clean data)."""
        return torch.cat([torch.ones(1, dtype=F64), self.alphas_cumprod[:-1]])

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t); +inf where SNR is 0."""
        ab = self.alphas_cumprod
        return ((1 - ab) / ab).sqrt()

    @property
    def snr(self) -> torch.Tensor:
        """SNR_t = alpha_bar_t / (1 - alpha_bar_t)."""
        ab = self.alphas_cumprod
        return ab / (1 - ab)

    @property
    def log_snr(self) -> torch.Tensor:
        """lambda_t = log SNR_t (-inf at a zero-terminal-SNR end)."""
        return self.snr.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """The largest finite sigma: at a zero-SNR end, ZERO_SNR_SIGMA_MAX stands in for infinity."""
        s = float(self.sigmas[-1])
        return s if math.isfinite(s) else ZERO_SNR_SIGMA_MAX

    # -- lookups at (fractional) t ------------------------------------------------------------
    def check_t(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=F64)
        if torch.isnan(t).any() or (t < 0).any() or (t > self.num_timesteps - 1).any():
            raise ValueError(f"t must lie in [0, {self.num_timesteps - 1}] (num_timesteps - 1), "
                             f"got values in [{t.min().item()}, {t.max().item()}]")
        return t

    def sigma_at(self, t) -> torch.Tensor:
        """sigma(t) for fractional t, linear in log sigma between neighbouring integer steps."""
        t = self.check_t(t)
        log_s = self.sigmas.log()
        lo = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - lo
        a, b = log_s[lo], log_s[lo + 1]
        between = ((1 - w) * a + w * b).exp()
        # integer t reads the table exactly (and avoids inf * 0 = nan at a zero-SNR end)
        return torch.where(w == 0, self.sigmas[lo], torch.where(w == 1, self.sigmas[lo + 1], between))

    def alpha_bar_at(self, t) -> torch.Tensor:
        """alpha_bar(t) = 1 / (1 + sigma(t)^2) for fractional t."""
        return 1 / (1 + self.sigma_at(t) ** 2)

    def t_for_sigma(self, sigma) -> torch.Tensor:
        """The inverse of :meth:`sigma_at`: the fractional timestep whose sigma is ``sigma``.
        Sigmas below sigma_min map to 0 and above the largest sigma to T - 1."""
        sigma = torch.as_tensor(sigma, dtype=F64)
        log_s = self.sigmas.log()
        ls = sigma.clamp(min=1e-300).log().clamp(log_s[0], log_s[-1])
        hi = torch.searchsorted(log_s, ls.reshape(-1)).reshape(ls.shape).clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        a, b = log_s[lo], log_s[hi]
        w = torch.where(torch.isinf(b), (ls == b).to(F64), (ls - a) / (b - a))
        return lo.to(F64) + w.clamp(0, 1)

    # -- sampling grids -------------------------------------------------------------------------
    def timesteps(self, steps: int, spacing: Spacing = "leading", steps_offset: int = 0) -> torch.Tensor:
        """The ``steps`` timesteps a sampler visits, largest first (see :func:`spaced_timesteps`)."""
        return spaced_timesteps(self.num_timesteps, steps, spacing, steps_offset)

    def sigma_grid(self, steps: int, sigmas: SigmaGrid = "default", spacing: Spacing = "leading",
                   rho: float = 7.0) -> torch.Tensor:
        """``steps + 1`` sigmas, largest first, ending at 0 (the clean data).

        "default": the model's own sigmas at the spaced timesteps; "karras": Karras et al.'s rho-grid
        between the schedule's sigma_min and sigma_max; "exponential": log-uniform between them. An explicit
        grid (1-D tensor or list, e.g. from :func:`diffusion_forge.sampling.grids.optimize_sigmas`) is checked
        by :func:`explicit_sigmas` against ``steps`` and the schedule's range, and returned."""
        if not isinstance(sigmas, str):
            return explicit_sigmas(sigmas, steps, self.sigma_min, float(self.sigmas[-1]))
        if sigmas == "default":
            s = self.sigma_at(self.timesteps(steps, spacing))
            return torch.cat([s, torch.zeros(1, dtype=F64)])
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if sigmas == "karras":
            return karras_sigmas(steps, self.sigma_min, self.sigma_max, rho)
        if sigmas == "exponential":
            return exponential_sigmas(steps, self.sigma_min, self.sigma_max)
        raise _choice_error("sigmas", sigmas, SIGMA_GRIDS)

    def __repr__(self) -> str:
        extra = ", zero_terminal_snr=True" if self.zero_terminal_snr else ""
        return f"NoiseSchedule({self.name!r}, num_timesteps={self.num_timesteps}{extra})"
