"""Sampler accuracy against NFE, ours and diffusers', measured in the same run.

The data distribution is a Gaussian mixture in 8 dimensions, so E[x0 | x_t] is known in closed form: the
"network" is the exact denoiser (returned as an epsilon prediction in float32, as a real network would be),
and every difference between samplers is discretisation error. For each NFE budget in {5, 10, 20, 50} every
sampler runs at the largest step count whose network evaluations fit the budget (counted, not assumed), from
the same per-sample seeds, on the linear (DDPM) schedule with 1000 training steps. Errors: Frechet distance
(evaluate.frechet_distance) and sliced Wasserstein-1 distance (64 random directions) to fresh true samples;
the "real vs real" row is the floor given by two independent true sample sets of the same size.

    python benchmarks/samplers.py [--n 10000] [--nfe 5 10 20 50] [--only ours] [--match ipndm]
    python benchmarks/samplers.py --best-options [--n 10000] [--screen-n 4000] [--nfe 5 10] [--shifts 0 0.6 -0.74]

--best-options: every diffusers scheduler at its best grid (spacing leading / leading + offset 1 / trailing /
linspace, times default / Karras / exponential / beta / Lu-lambda sigmas where the class takes them) and final-step
and solver options (final_sigmas_type, lower_order_final, euler_at_final, set_alpha_to_one; UniPC and DEIS
order 2 or 3) per budget, against every deterministic sampler of ours at data-independent options (default,
Karras and exponential grids, and the multistep ones on the grid sampling.grids.optimize_sigmas finds from the
model alone), on the zero-mean mixture and on the same mixture shifted by +0.6 and -0.74. Every configuration
of diffusers' is screened at --screen-n samples and the 3 best of each scheduler measured again at --n; ours
all run at --n. PASS: our best SWD at most half diffusers' best, or at most the real-vs-real floor (the largest
of 4 independent real sets).
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import diffusion_forge as df  # noqa: E402
from diffusion_forge.evaluate import frechet_distance_features  # noqa: E402
from diffusion_forge.sampling.registry import SAMPLERS  # noqa: E402

BUDGETS = (5, 10, 20, 50)
DIM, COMPONENTS = 8, 8
N_SAMPLES = 10000


class GaussianMixture:
    """x0 ~ sum_k w_k N(mu_k, diag(s_k^2)); under x_t = a x0 + sqrt(1 - a^2) eps the posterior mean is
    E[x0 | x_t] = sum_k p(k | x_t) (mu_k + a s_k^2 / (a^2 s_k^2 + 1 - a^2) (x_t - a mu_k))."""

    def __init__(self, seed: int = 0, dim: int = DIM, k: int = COMPONENTS, shift: float = 0.0):
        g = torch.Generator().manual_seed(seed)   # shift: every mean moves by it (a data set with non-zero mean)
        self.mu = (torch.rand(k, dim, generator=g, dtype=torch.float64) * 1.6 - 0.8) + shift
        self.std = torch.rand(k, dim, generator=g, dtype=torch.float64) * 0.2 + 0.05
        w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        self.w = w / w.sum()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        return self.mu[k] + self.std[k] * torch.randn(n, self.mu.shape[1], generator=generator, dtype=torch.float64)

    def posterior_mean(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x_t)
        for ab in alpha_bar.unique():          # samplers call with one noise level per batch: one pass
            rows = alpha_bar == ab
            out[rows] = self._posterior_mean(x_t[rows], float(ab))
        return out

    def _posterior_mean(self, x: torch.Tensor, ab: float) -> torch.Tensor:
        a = math.sqrt(ab)
        var = ab * self.std**2 + (1 - ab)                                   # (k, d)
        # log N(x; a mu_k, diag var_k) for every k with matrix products: sum_d (x - a mu)^2 / var
        quad = (x**2) @ (1 / var).T - 2 * a * x @ (self.mu / var).T + (a**2 * self.mu**2 / var).sum(1)
        resp = torch.softmax(self.w.log() - 0.5 * (quad + var.log().sum(1)), dim=1)    # (n, k)
        gain = a * self.std**2 / var                                          # (k, d)
        return resp @ (self.mu * (1 - a * gain)) + x * (resp @ gain)

    def model(self, schedule: df.NoiseSchedule, prediction: str = "epsilon"):
        """model(x_t, t) returning the exact prediction of the given kind (float32, like a network)."""
        def model(x_t, t):
            x_t = x_t.double()
            ab = schedule.alpha_bar_at(t.double().cpu().clamp(0, schedule.num_timesteps - 1))
            x0 = self.posterior_mean(x_t, ab)
            eps = (x_t - ab.sqrt()[:, None] * x0) / (1 - ab).sqrt()[:, None]
            return df.from_x0_eps(x0, eps, prediction, ab).float()
        model.calls = 0
        return model


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 64, seed: int = 0) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between the projected sets."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0)
    px, py = (x.double() @ dirs).sort(0).values, (y.double() @ dirs).sort(0).values
    return float((px - py).abs().mean())


def errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    return frechet_distance_features(x.double().numpy(), ref.double().numpy()), sliced_wasserstein(x, ref)


# ---------------------------------------------------------------------------------------------
# Configurations

def ours(name: str, sigmas: str = "default", note: str = "", options: dict | None = None, **kw):
    """One of our samplers (with ``options``, its sampler_options; ``note`` names them in the label);
    returns (label, run(model, schedule, shape, budget, seed) -> samples)."""
    spec, options = SAMPLERS[name], options or {}
    extra = ", ".join(v for v in ("" if sigmas == "default" else sigmas, note) if v)
    label = f"ours {name}" + (f" ({extra})" if extra else "")

    def run(model, schedule, shape, budget, seed, prediction="epsilon"):
        n = spec.steps_for(budget, **options)
        if n == 0:
            return None
        return df.sample(model, schedule, shape, sampler=name, steps=n, sigmas=sigmas, prediction=prediction,
                         generator=torch.Generator().manual_seed(seed), sampler_options=options or None, **kw)
    return label, run


def fit_scheduler(cls_name: str, config: dict, schedule, budget: int, prediction: str = "epsilon"):
    """(scheduler, n): a diffusers scheduler with ``config`` on ``schedule`` at the largest step count n whose
    model calls (len(timesteps)) fit the budget; n = 0 if none does."""
    import diffusers
    cls = getattr(diffusers, cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    base = {k: v for k, v in schedule.to_diffusers_config().items() if k in accepted}
    sched = cls(**base, **config, prediction_type=prediction)
    n = 0
    for m in range(1, budget + 1):
        try:
            sched.set_timesteps(m)
        except ValueError:  # e.g. PNDM's Runge-Kutta start needs a few steps
            continue
        if len(sched.timesteps) <= budget:
            n = m
    return sched, n


def theirs(label: str, cls_name: str, **config):
    """A diffusers scheduler at the largest step count whose model calls (len(timesteps)) fit the budget."""
    def run(model, schedule, shape, budget, seed, prediction="epsilon"):
        sched, n = fit_scheduler(cls_name, config, schedule, budget, prediction)
        if n == 0:
            return None
        return df.sample(model, schedule, shape, scheduler=sched, steps=n, prediction=prediction,
                         generator=torch.Generator().manual_seed(seed))
    return f"diffusers {label}", run


def diffusers_configs():
    clip = {"clip_sample": False}
    return [
        theirs("DDIM (leading)", "DDIMScheduler", timestep_spacing="leading", steps_offset=1, **clip),
        theirs("DDIM (trailing)", "DDIMScheduler", timestep_spacing="trailing", **clip),
        theirs("PNDM", "PNDMScheduler"),
        theirs("PNDM (PLMS)", "PNDMScheduler", skip_prk_steps=True),
        theirs("LMS", "LMSDiscreteScheduler"),
        theirs("Euler", "EulerDiscreteScheduler"),
        theirs("Euler ancestral", "EulerAncestralDiscreteScheduler"),
        theirs("Heun", "HeunDiscreteScheduler"),
        theirs("DPM++ 2M", "DPMSolverMultistepScheduler"),
        theirs("DPM++ 2M Karras", "DPMSolverMultistepScheduler", use_karras_sigmas=True),
        theirs("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++",
               use_karras_sigmas=True),
        theirs("DPM++ 3M", "DPMSolverMultistepScheduler", solver_order=3),
        theirs("UniPC (leading)", "UniPCMultistepScheduler", timestep_spacing="leading"),
        theirs("UniPC (trailing)", "UniPCMultistepScheduler", timestep_spacing="trailing"),
        theirs("DEIS", "DEISMultistepScheduler"),
    ]


def our_configs():
    """Every sampler on the default grid (the model's own sigmas, "trailing"), then the multistep samplers
    on the other two grids, which every sampler accepts."""
    extra = [ours(name, sigmas) for sigmas in ("exponential", "karras")
             for name in ("ipndm", "lms", "deis", "dpmpp_2m", "unipc")]
    free = {"afs": True, "free_last_step": True}   # no evaluation at either end of the grid (see sample_ipndm)
    extra += [ours("ipndm", sigmas, "free ends", free) for sigmas in ("default", "exponential", "karras")]
    return [ours(name) for name in SAMPLERS] + extra


# ---------------------------------------------------------------------------------------------

def measure(configs, budgets=BUDGETS, n: int = N_SAMPLES, seed: int = 0, schedule=None, verbose: bool = False):
    """{label: {budget: (frechet, sliced_wasserstein) or None}} and the real-vs-real floor."""
    torch.set_num_threads(1)
    schedule = schedule or df.NoiseSchedule.from_name("linear", 1000)
    gmm = GaussianMixture(seed)
    model = gmm.model(schedule)
    ref = gmm.sample(n, torch.Generator().manual_seed(seed + 1))
    floor = errors(gmm.sample(n, torch.Generator().manual_seed(seed + 2)), ref)
    table = {}
    for label, run in configs:
        t0 = time.time()
        row = {}
        for b in budgets:
            x = run(model, schedule, (n, DIM), b, seed + 3)
            row[b] = None if x is None else errors(x, ref)
        table[label] = row
        if verbose:
            print(f"  {label}: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    return table, floor


def winners(table, budgets=BUDGETS, prefix: str = "ours ", metric: int = 1) -> dict[int, str]:
    """The label with the smallest error (sliced Wasserstein by default) per budget among those with ``prefix``."""
    out = {}
    for b in budgets:
        rows = [(r[b][metric], label) for label, r in table.items() if label.startswith(prefix) and r[b] is not None]
        out[b] = min(rows)[1]
    return out


def markdown(table, floor, budgets=BUDGETS) -> str:
    head = "| sampler | " + " | ".join(f"FD @{b}" for b in budgets) + " | " + " | ".join(f"SWD @{b}" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(budgets))]
    best = {b: {m: min(r[b][m] for r in table.values() if r[b] is not None) for m in (0, 1)} for b in budgets}

    def cell(v, b, m):
        if v is None:
            return "n/a"
        s = f"{v[m]:.4f}"
        return f"**{s}**" if v[m] == best[b][m] else s
    for label, r in table.items():
        lines.append(f"| {label} | " + " | ".join(cell(r[b], b, 0) for b in budgets) + " | "
                     + " | ".join(cell(r[b], b, 1) for b in budgets) + " |")
    lines.append("| real vs real (floor) | " + " | ".join(f"{floor[0]:.4f}" for _ in budgets) + " | "
                 + " | ".join(f"{floor[1]:.4f}" for _ in budgets) + " |")
    return "\n".join(lines)


def robustness(n: int = N_SAMPLES, budget: int = 10) -> str:
    """A second table: the ends of the cosine schedule (sigma_max = 2e4, epsilon prediction) and of a
    zero-terminal-SNR schedule (sigma_max = inf, v-prediction), at one NFE budget, ours against diffusers."""
    schedules = {"cosine, epsilon": (df.NoiseSchedule.from_name("cosine", 1000), "epsilon"),
                 "linear zero-SNR, v": (df.NoiseSchedule.from_name("linear", 1000, zero_terminal_snr=True),
                                        "v_prediction")}
    rows = [ours(name) for name in ("euler", "heun", "dpmpp_2m", "unipc", "ipndm")] + [
        theirs("Euler (trailing)", "EulerDiscreteScheduler", timestep_spacing="trailing"),
        theirs("Heun (trailing)", "HeunDiscreteScheduler", timestep_spacing="trailing"),
        theirs("DPM++ 2M", "DPMSolverMultistepScheduler"),
        theirs("DPM++ 2M (trailing)", "DPMSolverMultistepScheduler", timestep_spacing="trailing"),
        theirs("UniPC (trailing)", "UniPCMultistepScheduler", timestep_spacing="trailing")]
    lines = ["| sampler | " + " | ".join(f"FD ({k})" for k in schedules) + " |", "|---|---|---|"]
    results = {}
    for key, (schedule, prediction) in schedules.items():
        gmm = GaussianMixture(0)
        model = gmm.model(schedule, prediction)
        ref = gmm.sample(n, torch.Generator().manual_seed(1))
        for label, run in rows:
            try:
                x = run(model, schedule, (n, DIM), budget, 3, prediction=prediction)
                results[label, key] = f"{errors(x, ref)[0]:.4f}"
            except Exception as e:  # noqa: BLE001 - report what diffusers does
                results[label, key] = f"error: {type(e).__name__}"
    for label, _ in rows:
        lines.append(f"| {label} | " + " | ".join(results[label, k] for k in schedules) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --best-options: every diffusers scheduler at its best grid and final-step options per budget, against ours
# at data-independent options (no ipndm afs / free_last_step), on the zero-mean mixture and shifted ones

BEST_SCHEDULERS = {  # label: (class, fixed config, solver options tried)
    "DDIM": ("DDIMScheduler", {"clip_sample": False}, {}),
    "Euler": ("EulerDiscreteScheduler", {}, {}),
    "Heun": ("HeunDiscreteScheduler", {}, {}),
    "LMS": ("LMSDiscreteScheduler", {}, {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}, {}),
    "DPM++ 3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}, {}),
    "UniPC": ("UniPCMultistepScheduler", {}, {"solver_order": (2, 3)}),
    "DEIS": ("DEISMultistepScheduler", {}, {"solver_order": (2, 3)}),
    "PNDM (PLMS)": ("PNDMScheduler", {"skip_prk_steps": True}, {}),
}
SPACING_OPTIONS = ({"timestep_spacing": "leading"}, {"timestep_spacing": "leading", "steps_offset": 1},
                   {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"})
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
FINAL_OPTIONS = {"final_sigmas_type": ("zero", "sigma_min"), "lower_order_final": (True, False),
                 "euler_at_final": (False, True), "set_alpha_to_one": (True, False)}
OPTIMISED = ("ipndm", "dpmpp_2m", "unipc", "deis", "lms")   # the multistep samplers run on optimize_sigmas' grid
SHIFTS = (0.0, 0.6, -0.74)


def best_option_configs(label: str, schedule, budget: int):
    """Every grid (spacing x sigma flag) and final-step / solver option combination the class takes, as
    (label, run) pairs; combinations that give the same scheduler grid with the same options run once."""
    import diffusers
    cls_name, fixed, solver = BEST_SCHEDULERS[label]
    accepted = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    grids = [{}] + [{f: True} for f in SIGMA_FLAGS if f in accepted]
    choices = {**{k: v for k, v in FINAL_OPTIONS.items() if k in accepted}, **solver}
    out, seen = [], set()
    for spacing, grid, combo in itertools.product(SPACING_OPTIONS, grids, itertools.product(*choices.values())):
        options = dict(zip(choices, combo))
        config = {**fixed, **spacing, **grid, **options}
        try:
            sched, n = fit_scheduler(cls_name, config, schedule, budget)
        except Exception:  # noqa: BLE001 - a combination this class refuses
            continue
        key = (n, tuple(sorted(options.items())), tuple(sched.timesteps.tolist()),
               tuple(getattr(sched, "sigmas", torch.zeros(0)).tolist()))
        if n == 0 or key in seen:
            continue
        seen.add(key)
        words = [f"{v}" if k == "timestep_spacing" else k.removeprefix("use_") if v is True else f"{k}={v}"
                 for k, v in config.items() if k not in fixed and v != accepted[k].default]
        out.append(theirs(f"{label} [{', '.join(words) or 'defaults'}]", cls_name, **config))
    return out


def optimised(name: str):
    """ours ``name`` on the grid :func:`optimize_sigmas` finds for this model and budget (256 noise draws)."""
    from diffusion_forge.sampling.grids import optimize_sigmas
    cache = {}

    def run(model, schedule, shape, budget, seed, prediction="epsilon"):
        key = (model, budget)   # the model itself (held here): an id could be reused by a later one
        if key not in cache:
            D = df.Denoiser(model, schedule, prediction)
            cache[key] = optimize_sigmas(D, name, budget, shape[1:], n=256, seed=0)
        return df.sample(model, schedule, shape, sampler=name, steps=len(cache[key]) - 1, sigmas=cache[key],
                         prediction=prediction, generator=torch.Generator().manual_seed(seed))
    return f"ours {name} (optimised grid)", run


def _scores(configs, model, schedule, ref, budget) -> dict:
    """{label: (SWD, FD)} at len(ref) samples; a run that fails (a diffusers combination with a singular solve)
    is left out, one that diverges scores inf."""
    out = {}
    for label, run in configs:
        try:
            x = run(model, schedule, (len(ref), DIM), budget, 3)
        except Exception:  # noqa: BLE001
            continue
        if x is not None:
            out[label] = errors(x, ref)[::-1] if torch.isfinite(x).all() else (math.inf, math.inf)
    return out


def best_options(n: int, screen_n: int, budgets, shifts=SHIFTS, keep: int = 3) -> str:
    """Screen every diffusers configuration at ``screen_n`` samples, re-measure the ``keep`` best of each
    scheduler at ``n``, run all of ours at ``n`` (few: screening could drop a winner by noise), and tabulate
    the best of each side per budget (SWD)."""
    torch.set_num_threads(1)
    schedule = df.NoiseSchedule.from_name("linear", 1000)
    deterministic = [k for k, v in SAMPLERS.items() if not v.stochastic and k != "ddpm"]
    mine = [ours(k, g) for g in ("default", "karras", "exponential") for k in deterministic]
    mine += [optimised(k) for k in OPTIMISED]
    lines, by_swd = [], lambda kv: kv[1][0]
    for shift in shifts:
        gmm = GaussianMixture(0, shift=shift)
        model = gmm.model(schedule)
        refs = {m: gmm.sample(m, torch.Generator().manual_seed(1)) for m in {n, screen_n}}
        # the floor: real vs real, the largest over 4 independent real sets (one alone is itself a random draw)
        floors = [errors(gmm.sample(n, torch.Generator().manual_seed(s)), refs[n]) for s in (2, 4, 5, 6)]
        floor = (max(f[0] for f in floors), max(f[1] for f in floors))
        lines += [f"\n### Gaussian mixture shifted by {shift:+.2f} (data mean {float(gmm.w @ gmm.mu.mean(1)):+.2f})",
                  "", "| NFE | scheduler | best options | SWD | FD |", "|---|---|---|---|---|"]
        summary = []
        for b in budgets:
            best = {}
            for label in BEST_SCHEDULERS:
                configs = best_option_configs(label, schedule, b)
                if screen_n < n:
                    screened = _scores(configs, model, schedule, refs[screen_n], b)
                    top = sorted(screened, key=lambda lab: screened[lab][0])[:keep]
                    configs = [c for c in configs if c[0] in top]
                res = _scores(configs, model, schedule, refs[n], b)
                if res:
                    best[label] = min(res.items(), key=by_swd)
            mine_res = sorted(_scores(mine, model, schedule, refs[n], b).items(), key=by_swd)
            for label, (full, (swd, fd)) in sorted(best.items(), key=lambda kv: kv[1][1][0]):
                lines.append(f"| {b} | {label} | {full.split('[', 1)[1][:-1]} | {swd:.4f} | {fd:.4f} |")
            lines += [f"| {b} | {label} | data-independent | {swd:.4f} | {fd:.4f} |"
                      for label, (swd, fd) in mine_res[:3]]
            (o_lab, (o_swd, o_fd)), (t_lab, (t_swd, t_fd)) = mine_res[0], min(best.values(), key=by_swd)
            ok = o_swd / t_swd <= 0.5 or o_swd <= floor[1]
            summary.append(f"| {b} | {o_lab.removeprefix('ours ')} | {o_swd:.4f} / {o_fd:.4f} | "
                           f"{t_lab.removeprefix('diffusers ')} | {t_swd:.4f} / {t_fd:.4f} | {o_swd / t_swd:.2f} | "
                           f"{floor[1]:.4f} / {floor[0]:.4f} | {'PASS' if ok else 'FAIL'} |")
        head = ("| NFE | our best | SWD / FD | diffusers' best | SWD / FD | ratio (SWD) | floor SWD / FD (max of 4) "
                "| ratio <= 0.5 or SWD <= floor |")
        lines += ["", head, "|---|---|---|---|---|---|---|---|", *summary]
        print("\n".join(lines[-len(summary):]), file=sys.stderr, flush=True)   # progress
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=N_SAMPLES, help="samples per configuration")
    p.add_argument("--budgets", "--nfe", type=int, nargs="+", default=list(BUDGETS), help="NFE budgets")
    p.add_argument("--match", help="only the rows whose label contains this text")
    p.add_argument("--only", choices=("ours", "diffusers", "all"), default="all")
    p.add_argument("--robustness", action="store_true", help="only the table at the ends of cosine / zero-SNR")
    p.add_argument("--best-options", action="store_true",
                   help="diffusers at its best options against ours at data-independent ones, on mixtures "
                        "shifted by 0, +0.6, -0.74 (default --nfe 5 10)")
    p.add_argument("--screen-n", type=int, default=4000, help="--best-options: samples of the first screening")
    p.add_argument("--shifts", type=float, nargs="+", default=list(SHIFTS), help="--best-options: mixture shifts")
    args = p.parse_args(argv)
    if args.best_options:
        t0 = time.time()
        budgets = args.budgets if args.budgets != list(BUDGETS) else [5, 10]
        print(best_options(args.n, args.screen_n, budgets, tuple(args.shifts)))
        print(f"n = {args.n} (screening {args.screen_n}); {time.time() - t0:.0f}s", file=sys.stderr)
        return
    if args.robustness:
        print(robustness(args.n))
        return
    configs = ([] if args.only == "diffusers" else our_configs()) + ([] if args.only == "ours" else diffusers_configs())
    if args.match:
        configs = [c for c in configs if args.match in c[0]]
    t0 = time.time()
    table, floor = measure(configs, tuple(args.budgets), args.n, verbose=True)
    print(markdown(table, floor, tuple(args.budgets)))
    w_ours = winners(table, tuple(args.budgets))
    if args.only == "all":
        w_theirs = winners(table, tuple(args.budgets), prefix="diffusers ")
        print("\n| NFE | our best (SWD) | diffusers' best (SWD) | ratio |\n|---|---|---|---|")
        for b in args.budgets:
            o, t = table[w_ours[b]][b][1], table[w_theirs[b]][b][1]
            print(f"| {b} | {w_ours[b]} {o:.4f} | {w_theirs[b]} {t:.4f} | {o / t:.2f} |")
    defaults = {k: v for k, v in table.items() if "(" not in k}
    defaults = winners(defaults, tuple(args.budgets)) if defaults else {}
    print(f"\nour best per budget: { {b: w.removeprefix('ours ') for b, w in w_ours.items()} }")
    print(f"our best on the default grid (registry.ODE_SAMPLERS): "
          f"{ {b: w.removeprefix('ours ') for b, w in defaults.items()} }")
    print(f"n = {args.n} samples, dim = {DIM}, {COMPONENTS} components; {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
