"""Parity of every sampler in the registry with diffusers' own scheduler (diffusers' step code, driven here
step by step) at identical sigmas and the same initial and per-step noise, on two models: the exact
epsilon of a Gaussian mixture (a smooth nonlinear denoiser) and a small random network. Where diffusers has
no scheduler for a sampler or an option, tests/test_sampler_parity_ref.py holds a reference written from
the paper's equations.

Where a sampler differs from diffusers on purpose, the test says so and compares where both are defined:
- Sigma-space schedulers (Euler, Euler ancestral, Heun, LMS, KDPM2) start from x = sigma_max z on
  "trailing" / "linspace" grids (x_t slightly below unit variance); we start from the prior x_t = z. The
  diffusers loop is started from our x here (on "leading" both start there anyway).
- DEIS: diffusers' grid ends at sigma(t = 0), not 0 (it has no final_sigmas_type), so its sample keeps that
  noise; ours lands on sigma = 0 like every sampler. Compared on diffusers' grid and, on ours, against
  diffusers with its last sigma set to 1e-8.
- PNDM: diffusers' default set_alpha_to_one=False also ends at alpha_bar(t = 0); compared with True.
- iPNDM: diffusers' IPNDMScheduler has its own grid, so it is given ours through trained_betas (its noise
  std per step) and fed v = alpha eps - sigma x0, the output it expects.
- DEIS's third-order coefficients are computed by diffusers in float32 from differences of large terms
  (9e-6 off); its sigmas are cast to float64 for the comparison.
- diffusers calls the network at integer timesteps on its Karras / exponential grids (rounded or truncated
  from the grid's sigma) while it steps with the exact sigma; ours evaluate at the sigma's own fractional t,
  so those grids are not compared; DDIM's "linspace" steps to t - T // n rather than to the next timestep of
  its own grid, so DDIM is compared on "trailing" and "leading"; UniPC bh1 gives nan on a last sigma of 0
  (B(h) = -h = -inf times a zero correction), so it runs with its last sigma set to 1e-8.
- dpmpp_3m_sde: diffusers' sde-dpmsolver++ third-order step has the sign of the 1/2 in its D2 coefficient
  flipped (an O(1) term where the exact one is O(h)); so only the ODE form (eta = 0) is compared with
  diffusers, the SDE form with the reference in test_sampler_parity_ref.py.
Tolerance: 1e-5 absolute everywhere (diffusers keeps its sigmas and some updates in float32; ours run in
float64); measured: 3e-8 to 1.6e-6 (report of issue 13).
"""
from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

import diffusion_forge as df
from diffusion_forge.sampling.registry import SAMPLERS
from diffusion_forge.sampling.utils import Noise

import diffusers  # noqa: E402  (a core dependency: never skipped)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
SD = df.NoiseSchedule.from_name("scaled_linear", 1000, 0.00085, 0.012)   # Stable Diffusion's
SHAPE, STEPS, TOL = (5, 3), 10, 1e-5
F64 = torch.float64


class MixtureEps:
    """The exact epsilon of a 2-component Gaussian mixture in 3-D, E[eps | x_t], in float64."""
    mu = torch.tensor([[0.5, -0.3, 0.2], [-0.6, 0.4, -0.1]], dtype=F64)
    std = torch.tensor([[0.3, 0.2, 0.4], [0.25, 0.35, 0.15]], dtype=F64)
    logw = torch.tensor([0.6, 0.4], dtype=F64).log()

    def __call__(self, x_t, t):
        x_t, ab = x_t.to(F64), SD.alpha_bar_at(t.to(F64).clamp(0, 999))[:, None]
        a = ab.sqrt()[:, None]
        var = a**2 * self.std**2 + 1 - a**2
        diff = x_t[:, None, :] - a * self.mu
        resp = torch.softmax(self.logw - 0.5 * (diff**2 / var + var.log()).sum(-1), 1)[..., None]
        x0 = (resp * (self.mu + a * self.std**2 / var * diff)).sum(1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


class RandomNet(torch.nn.Module):
    """A small random epsilon network (seeded, float64): eps = 0.8 x_t + 0.4 tanh(MLP(x_t, t / 1000))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 3)).double()

    def forward(self, x_t, t):
        h = torch.cat([x_t.to(F64), t.to(F64)[:, None] / 1000], 1)
        return 0.8 * x_t.to(F64) + 0.4 * torch.tanh(self.mlp(h))


MODELS = {"mixture": MixtureEps(), "net": RandomNet()}


def gens(seed=7):
    return [torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])]


def scheduler(cls, **config):
    base = {k: v for k, v in SD.to_diffusers_config().items() if k != "rescale_betas_zero_snr"}
    return getattr(diffusers, cls)(**{**base, **config})


def run_diffusers(sched, model, steps=STEPS, begin=0, x=None, generators=None, prepare=None):
    """diffusers' loop (scale_model_input -> network -> step), started from our prior x_t = z: x = z for
    schedulers on x_t, x = z sqrt(1 + sigma_0^2) for those in sigma space (init_noise_sigma > 1). ``begin``:
    start at that index of the timesteps (diffusers' set_begin_index), from the given sigma-space ``x``."""
    sched = copy.deepcopy(sched)
    sched.set_timesteps(steps)
    if prepare is not None:
        prepare(sched)
    generators = generators or gens()
    sigma_space = float(sched.init_noise_sigma) > 1
    if x is None:
        z = Noise(generators, SHAPE, "cpu", F64)()
        x = z * math.sqrt(1 + float(SD.sigma_at(int(sched.timesteps[0])))**2) if sigma_space else z
    if begin:
        sched.set_begin_index(begin)
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    for t in sched.timesteps[begin:]:
        out = model(sched.scale_model_input(x, t), torch.full((SHAPE[0],), float(t), dtype=F64))
        x = sched.step(out, t, x, **({"generator": generators} if takes_generator else {})).prev_sample
    return x.to(F64)


def ours(model, name, steps=STEPS, **kw):
    D = df.Denoiser(model, SD, model_dtype=F64)
    return df.sample(D, shape=SHAPE, sampler=name, steps=steps, generator=gens(), dtype=F64, **kw)


def close(mine, theirs, tol=TOL):
    assert torch.isfinite(mine).all() and mine.abs().max() > 0.05
    err = (mine - theirs).abs().max().item()
    assert err < tol, f"max abs difference {err:.2e} > {tol:g}"
    return err


# (our sampler, our df.sample options, diffusers scheduler, its config): same grid, same start, same noise
PARITY = [
    ("ddpm", {}, "DDPMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}),
    ("ddpm", {"spacing": "leading", "sampler_options": {"variance": "beta"}}, "DDPMScheduler",
     {"clip_sample": False, "variance_type": "fixed_large", "timestep_spacing": "leading"}),
    ("ddim", {}, "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}),
    ("ddim", {"spacing": "leading"}, "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "leading"}),
    ("euler", {}, "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("euler", {"spacing": "leading"}, "EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
    ("euler_ancestral", {}, "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("heun", {"sampler_options": {"euler_start": False}}, "HeunDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("dpm_2", {"sampler_options": {"euler_start": False}}, "KDPM2DiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("dpm_2", {"spacing": "leading", "sampler_options": {"euler_start": False}}, "KDPM2DiscreteScheduler",
     {"timestep_spacing": "leading"}),
    ("lms", {}, "LMSDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("pndm", {"sampler_options": {"euler_start": False}}, "PNDMScheduler",
     {"skip_prk_steps": False, "set_alpha_to_one": True, "timestep_spacing": "trailing"}),
    ("pndm", {"spacing": "leading", "sampler_options": {"euler_start": False}}, "PNDMScheduler",
     {"skip_prk_steps": False, "set_alpha_to_one": True, "timestep_spacing": "leading"}),
    ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    ("dpmpp_2m_sde", {}, "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "timestep_spacing": "trailing"}),
    ("dpmpp_3m_sde", {"eta": 0.0}, "DPMSolverMultistepScheduler",
     {"solver_order": 3, "solver_type": "heun", "lower_order_final": False, "timestep_spacing": "trailing"}),
    ("unipc", {}, "UniPCMultistepScheduler", {"timestep_spacing": "trailing"}),
    ("unipc", {"sampler_options": {"variant": "bh1"}}, "UniPCMultistepScheduler",
     {"solver_type": "bh1", "timestep_spacing": "trailing", "last_sigma": 1e-8}),
]


def _id(case):
    name, mine, cls, _ = case
    extra = [str(v) for v in mine.get("sampler_options", {}).values()]
    return "-".join([name, cls.removesuffix("Scheduler"), mine.get("spacing", "trailing"), *extra])


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("name, mine, cls, config", PARITY, ids=[_id(c) for c in PARITY])
def test_parity_with_diffusers(name, mine, cls, config, model):
    config = dict(config)
    last = config.pop("last_sigma", None)
    prepare = None if last is None else (lambda s: s.sigmas.__setitem__(-1, last))
    theirs = run_diffusers(scheduler(cls, **config), MODELS[model], prepare=prepare)
    close(ours(MODELS[model], name, **mine), theirs)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("name, cls", [("heun", "HeunDiscreteScheduler"), ("dpm_2", "KDPM2DiscreteScheduler")])
def test_euler_start_is_an_euler_step_then_diffusers_two_stage_scheduler(name, cls, model):
    """The default ``euler_start``: the first step is diffusers' Euler step, the rest is diffusers' Heun /
    KDPM2 from the second sigma on (set_begin_index(2): its first-order stage at t_1, as img2img starts)."""
    net = MODELS[model]
    euler = copy.deepcopy(scheduler("EulerDiscreteScheduler", timestep_spacing="trailing"))
    euler.set_timesteps(STEPS)
    g = gens()
    z = Noise(g, SHAPE, "cpu", F64)()
    x = z * math.sqrt(1 + float(euler.sigmas[0]) ** 2)
    t0 = euler.timesteps[0]
    x = euler.step(net(euler.scale_model_input(x, t0), torch.full((SHAPE[0],), float(t0), dtype=F64)), t0, x).prev_sample
    theirs = run_diffusers(scheduler(cls, timestep_spacing="trailing"), net, begin=2, x=x.to(F64), generators=g)
    close(ours(net, name), theirs)
    assert ours(net, name, sampler_options={"euler_start": False}).sub(theirs).abs().max() > 1e-4  # not vacuous


@pytest.mark.parametrize("model", sorted(MODELS))
def test_ipndm_equals_diffusers_ipndm_on_our_grid(model):
    net, grid = MODELS[model], SD.sigma_grid(STEPS, "default", "trailing")
    ts = SD.timesteps(STEPS, "trailing")
    noise_std, signal = grid / (1 + grid**2).sqrt(), 1 / (1 + grid**2).sqrt()
    sched = diffusers.IPNDMScheduler(trained_betas=noise_std.tolist())
    sched.set_timesteps(STEPS)
    x = Noise(gens(), SHAPE, "cpu", F64)()      # x_t = z, the prior
    for i, t in enumerate(sched.timesteps):
        eps = net(x, torch.full((SHAPE[0],), float(ts[i]), dtype=F64))
        x0 = (x - noise_std[i] * eps) / signal[i]
        x = sched.step(signal[i] * eps - noise_std[i] * x0, t, x).prev_sample   # v = alpha eps - sigma x0
    close(ours(net, "ipndm"), x)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("order", [2, 3])   # diffusers' default solver_order is 2, ours 3
def test_deis_equals_diffusers_deis(model, order):
    """On diffusers' own grid (ending at sigma(t = 0), our sampler function called with those sigmas) and on
    ours (ending at 0: diffusers with its last sigma set to 1e-8, where its first-order step gives x0)."""
    net, sched = MODELS[model], scheduler("DEISMultistepScheduler", timestep_spacing="trailing", solver_order=order)
    # diffusers' third-order coefficients (ind_fn) cancel large terms in float32 (9e-6 off); in float64 its sigmas
    f64 = lambda s: setattr(s, "sigmas", s.sigmas.to(F64))  # noqa: E731
    theirs = run_diffusers(sched, net, prepare=f64)
    their_grid = copy.deepcopy(sched)
    their_grid.set_timesteps(STEPS)
    sigmas = their_grid.sigmas.to(F64)
    D = df.Denoiser(net, SD, model_dtype=F64)
    x = Noise(gens(), SHAPE, "cpu", F64)() * math.sqrt(1 + float(sigmas[0]) ** 2)
    mine = SAMPLERS["deis"].fn(D, x, sigmas.tolist(), None, order=order) / math.sqrt(1 + float(sigmas[-1]) ** 2)
    close(mine, theirs)
    to_zero = lambda s: (f64(s), s.sigmas.__setitem__(-1, 1e-8))  # noqa: E731
    close(ours(net, "deis", sampler_options={"order": order}), run_diffusers(sched, net, prepare=to_zero))
    if order == 2:   # to sigma = 0 the last step is first order anyway: lower_order_final changes nothing
        return
    # lower_order_final is diffusers' default; without it the step before the last keeps third order
    free = ours(net, "deis", sampler_options={"order": order, "lower_order_final": False})
    assert free.sub(run_diffusers(sched, net, prepare=to_zero)).abs().max() > 1e-4


def test_every_sampler_has_a_reference():
    """Every registered sampler is compared with diffusers here or with a paper reference in
    test_sampler_parity_ref.py (dpmpp_3m_sde with eta = 1)."""
    here = {c[0] for c in PARITY} | {"heun", "dpm_2", "ipndm", "deis"}
    assert here == set(SAMPLERS)
