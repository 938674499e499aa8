"""diffusers compatibility, at the edges only. diffusers is imported lazily, inside the functions."""
from __future__ import annotations

import copy
import inspect
from typing import Callable

import torch

from ..core.process import check_prediction
from ..sampling.utils import per_sample_generators

# =============================================================================================
# Schedulers: run any diffusers scheduler through diffusion_forge.sample(..., scheduler=...)
# (owner: samplers)


def per_sample_randn(generators, shape, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn per sample on the CPU, exactly as diffusers' ``randn_tensor`` does with a
    list of generators (so the two worlds start from the same noise)."""
    z = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators])
    return z.to(device, dtype)


@torch.no_grad()
def sample_with_scheduler(model: Callable, scheduler, shape, steps: int = 20, prediction: str = "epsilon",
                          generator=None, callback: Callable | None = None, device=None,
                          dtype: torch.dtype | None = None, **cond) -> torch.Tensor:
    """Sample with a diffusers scheduler's own loop: ``set_timesteps(steps)``, then for every timestep
    ``scale_model_input`` -> ``model(x_t, t, **cond)`` -> ``step``. The initial noise and every noise the
    scheduler draws come per sample from CPU generators (one per sample, or seeds drawn from a single one,
    as :func:`diffusion_forge.sample` does). The scheduler is copied, so the one passed in is not changed.

    ``prediction`` must equal the scheduler's ``prediction_type`` (the scheduler converts the model output
    according to its config); ``steps`` is passed to ``set_timesteps`` (for two-stage schedulers such as Heun
    the network is called more often than that). The callback gets ``step``, ``x_t``, ``t`` and ``x0``
    (the scheduler's ``pred_original_sample``, or None when it reports none).
    """
    check_prediction(prediction)
    own = getattr(scheduler.config, "prediction_type", prediction)
    if own != prediction:
        raise ValueError(f"the scheduler is configured with prediction_type={own!r} but prediction={prediction!r}; "
                         f"make them equal (e.g. {type(scheduler).__name__}.from_config(config, "
                         f"prediction_type={prediction!r}))")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = dtype or (param.dtype if param is not None and param.is_floating_point() else torch.float32)

    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps, device=device)
    generators = per_sample_generators(generator, shape[0])
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    x = per_sample_randn(generators, shape, device, dtype) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x_t = scheduler.scale_model_input(x, t)
        tt = torch.full((shape[0],), float(t), dtype=torch.float32, device=device)
        out = model(x_t.to(dtype), tt, **cond)
        extra = {"generator": generators} if takes_generator else {}
        result = scheduler.step(out, t, x, return_dict=True, **extra)
        if callback is not None:
            callback({"step": i, "x_t": x_t, "t": float(t), "sigma": None,
                      "x0": getattr(result, "pred_original_sample", None)})
        x = result.prev_sample
    return x.to(dtype)

# =============================================================================================
