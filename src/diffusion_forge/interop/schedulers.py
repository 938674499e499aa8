"""diffusers compatibility, at the edges only. diffusers is imported lazily, inside the functions."""
from __future__ import annotations

import copy
import inspect
from typing import Callable

import torch

from ..core.process import to_x0_eps
from ..core.schedules import NoiseSchedule
from ..denoise.denoiser import Denoiser, DenoiserWrapper
from ..device import model_device_dtype
from ..sampling.utils import Noise, per_sample_generators

# =============================================================================================
# Schedulers: run any diffusers scheduler through diffusion_forge.sample(..., scheduler=...)
# (owner: samplers)


@torch.no_grad()
def sample_with_scheduler(model, scheduler, shape, steps: int = 20, prediction: str | None = None,
                          generator=None, callback: Callable | None = None, device=None,
                          dtype: torch.dtype | None = None, schedule=None, cond: dict | None = None) -> torch.Tensor:
    """Sample with a diffusers scheduler's own loop: ``set_timesteps(steps)``, then for every timestep
    ``scale_model_input`` -> ``network(x_t, t, **cond)`` -> ``step``. ``model``: a :class:`Denoiser` (its
    network is called; wrappers need our samplers) or a network (with ``schedule`` / ``prediction`` as
    :class:`Denoiser` takes them; a bare network without a schedule: the scheduler's). The initial noise and every noise the scheduler draws come per sample
    from CPU generators (one per sample, or seeds drawn from a single one, as :func:`diffusion_forge.sample`
    does). The scheduler is copied, so the one passed in is not changed.

    The denoiser's prediction must equal the scheduler's ``prediction_type`` (the scheduler converts the
    model output according to its config); ``steps`` is passed to ``set_timesteps`` (for two-stage schedulers
    such as Heun the network is called more often than that). The callback gets the same dict as
    :func:`diffusion_forge.sample`'s: ``step``, ``x_t`` (the network's input), ``t``, ``sigma`` (the
    schedule's sigma at t) and ``x0`` (the scheduler's ``pred_original_sample``, else the x0 the network's
    output implies at t).
    """
    if isinstance(model, DenoiserWrapper):
        raise ValueError(f"a diffusers scheduler runs the network's own loop; {type(model).__name__} needs one of "
                         "our samplers (sampler=...)")
    if not isinstance(model, Denoiser):
        if schedule is None and getattr(model, "diffusion_config", None) is None:
            schedule = NoiseSchedule.from_diffusers(scheduler.config)   # a bare network: the scheduler's own
        model = Denoiser(model, schedule, prediction, model_dtype=dtype)
    elif prediction is not None and prediction != model.prediction:
        raise ValueError(f"prediction={prediction!r} contradicts the denoiser's own {model.prediction!r}")
    D, prediction = model, model.prediction
    own = getattr(scheduler.config, "prediction_type", prediction)
    if own != prediction:
        raise ValueError(f"the scheduler is configured with prediction_type={own!r} but prediction={prediction!r}; "
                         f"make them equal (e.g. {type(scheduler).__name__}.from_config(config, "
                         f"prediction_type={prediction!r}))")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    device, _ = model_device_dtype(D, device, None)
    dtype = dtype or D.model_dtype
    cond = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in (cond or {}).items()}

    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps, device=device)
    generators = per_sample_generators(generator, shape[0])
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    x = Noise(generators, shape, device, dtype)() * scheduler.init_noise_sigma  # diffusers' randn_tensor, per sample
    for i, t in enumerate(scheduler.timesteps):
        x_t = scheduler.scale_model_input(x, t)
        tt = torch.full((shape[0],), float(t), dtype=torch.float32, device=device)
        out = D.network(x_t.to(dtype), tt, **cond)
        extra = {"generator": generators} if takes_generator else {}
        result = scheduler.step(out, t, x, return_dict=True, **extra)
        if callback is not None:
            tf = min(max(float(t), 0.0), D.schedule.num_timesteps - 1)
            x0 = getattr(result, "pred_original_sample", None)
            if x0 is None:  # x0 = to_x0_eps(network output) at alpha_bar(t)
                x0 = to_x0_eps(out, prediction, x_t.to(out.dtype), D.schedule.alpha_bar_at(tf))[0]
            callback({"step": i, "x_t": x_t, "t": float(t), "sigma": float(D.schedule.sigma_at(tf)), "x0": x0})
        x = result.prev_sample
    return x.to(dtype)

# =============================================================================================
