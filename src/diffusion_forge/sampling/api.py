"""``df.sample``: draw samples from a network and its schedule, or from a (wrapped) Denoiser."""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from ..core.schedules import SIGMA_GRIDS, SPACINGS, NoiseSchedule
from ..denoise.denoiser import ClipX0, DenoiserBase, DynamicThreshold, as_denoiser, network_autocast
from ..denoise.guidance import ClassifierFreeGuidance, check_class_labels, num_classes_of
from ..device import model_device_dtype
from .registry import SAMPLERS, resolve_sampler
from .brownian import make_noise
from .utils import per_sample_generators, start, work_dtype

__all__ = ["sample", "check_cond", "apply_guidance", "PRECISIONS", "sampling_autocast_dtype"]

PRECISIONS = ("no", "bf16", "fp16", "auto")


def _noop(*args):
    pass


def check_cond(cond) -> dict:
    """The conditioning dict passed to the network as keyword arguments ({} for none)."""
    if cond is None:
        return {}
    if not isinstance(cond, dict):
        raise ValueError(f"cond must be a dict of keyword arguments for the network (e.g. "
                         f"{{'class_labels': labels}}), got {type(cond).__name__}")
    return dict(cond)


def sampling_autocast_dtype(precision: str, device) -> torch.dtype | None:
    """The autocast dtype of the network's forward under ``precision``: "no" -> None (the network's own dtype),
    "bf16" -> torch.bfloat16, "fp16" -> torch.float16 (CUDA only), "auto" -> bf16 where
    ``training.precision.resolve_precision("auto", device)`` says bf16 (CUDA with bf16, a CPU with native bf16
    instructions), else None (never fp16). Anything else is a ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: no (float32), bf16, fp16 (CUDA only), "
                         "auto (bf16 where the hardware has it, else float32)")
    device = torch.device(device)
    if precision == "auto":
        from ..training.precision import resolve_precision

        precision = "bf16" if resolve_precision("auto", device) == "bf16" else "no"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision='fp16' runs on CUDA only, and this is {device.type}: use precision='bf16' "
                         "or 'no'")
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def apply_x0_wrappers(D: DenoiserBase, clip_x0: bool | float = False,
                      dynamic_threshold: float | tuple[float, float] | None = None) -> DenoiserBase:
    """``clip_x0`` (True: [-1, 1]; a number c: [-c, c]) -> :class:`ClipX0`; ``dynamic_threshold`` (a quantile
    p or (p, max_value)) -> :class:`DynamicThreshold`."""
    if clip_x0 is not False and clip_x0 is not None and dynamic_threshold is not None:
        raise ValueError("pass clip_x0 or dynamic_threshold, not both (thresholding already bounds x0)")
    if dynamic_threshold is not None:
        p, top = (dynamic_threshold, math.inf) if isinstance(dynamic_threshold, (int, float)) else dynamic_threshold
        return DynamicThreshold(D, p, top)
    if clip_x0 is not False and clip_x0 is not None:
        return ClipX0(D, 1.0 if clip_x0 is True else clip_x0)
    return D


def apply_guidance(D: DenoiserBase, guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                   guidance_interval: tuple[float, float] | None = None, cond: dict | None = None) -> DenoiserBase:
    """``guidance_scale`` w -> :class:`ClassifierFreeGuidance` (pred = pred_uncond + w (pred_cond - pred_uncond))
    with ``guidance_rescale`` and ``guidance_interval``; None: no guidance (then the labels may be 0..K, K the
    null class). Class ids of ``cond`` are checked against the classes the denoiser knows."""
    labels = (cond or {}).get("class_labels")
    if guidance_scale is None:
        if guidance_rescale or guidance_interval is not None:
            raise ValueError("guidance_rescale / guidance_interval apply to classifier-free guidance: pass "
                             "guidance_scale= too (e.g. guidance_scale=3.0)")
        check_class_labels(labels, num_classes_of(D), allow_null=True)
        return D
    return ClassifierFreeGuidance(D, guidance_scale, rescale=guidance_rescale, interval=guidance_interval)


def _check_shape(shape) -> tuple[int, ...]:
    if shape is None:
        raise ValueError("shape= is required: (batch, *sample_shape), e.g. (16, 1, 28, 28)")
    shape = tuple(int(v) for v in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (batch, *sample_shape) with positive sizes, got {shape}")
    return shape


@torch.no_grad()
def sample(model: Callable | DenoiserBase, schedule: NoiseSchedule | None = None, shape=None,
           sampler: str | None = None, steps: int = 20, prediction: str | None = None, generator=None,
           sigmas: str | torch.Tensor | list = "default", spacing: str = "trailing", callback: Callable | None = None,
           cond: dict | None = None, clip_x0: bool | float = False,
           dynamic_threshold: float | tuple[float, float] | None = None, eta: float | None = None,
           s_noise: float | None = None, sampler_options: dict | None = None, device=None,
           dtype: torch.dtype | None = None, scheduler=None, guidance_scale: float | None = None,
           guidance_rescale: float = 0.0, guidance_interval: tuple[float, float] | None = None,
           precision: str = "no", noise: str = "independent") -> torch.Tensor:
    """Draw ``shape[0]`` samples from ``model(x_t, t, **cond)`` trained on ``schedule``, or from a (wrapped)
    :class:`~diffusion_forge.Denoiser` passed in place of both (``sample(D, shape=...)``).

    schedule, prediction: for a network, default to its ``diffusion_config`` (else: schedule required,
        prediction "epsilon"); one that contradicts it, or the Denoiser's, is an error.
    sampler: a name from ``SAMPLERS`` (``steps`` is then its number of steps), or None for the registry's
        default for the NFE budget ``steps`` (``registry.resolve_sampler``: dpmpp_2m_sde at eta 5, s_tmax 5 today).
    sigmas, spacing: the grid, an option of every sampler: "default" (the model's own sigmas at timesteps
        spaced "leading", "trailing" or "linspace", as diffusers does), "karras" or "exponential" (between
        the schedule's sigma_min and sigma_max; spacing is then unused). The default spacing is "trailing",
        which starts at the last training step (pure noise) for every step count (Lin et al. 2023). Or an
        explicit grid: a 1-D tensor / list of ``steps + 1`` sigmas, largest first, ending with 0 (appended if
        missing), e.g. from :func:`diffusion_forge.sampling.grids.optimize_sigmas`.
    generator: a CPU ``torch.Generator`` or a list with one per sample; the noise of sample i comes from its
        own generator, so a seed gives the same sample whatever else is in the batch.
    callback: called at every step with a dict of ``step``, ``x_t`` (the model's input), ``t`` (float
        timestep), ``sigma`` and ``x0`` (the clean-data prediction).
    cond: the conditioning, one dict of keyword arguments of the network (e.g. ``{"class_labels": y}``).
    clip_x0: clamp the x0 prediction to [-1, 1] (or [-c, c] for a number c): :class:`ClipX0`.
        dynamic_threshold: Imagen's quantile p (or (p, max_value)): :class:`DynamicThreshold`.
    eta, s_noise, sampler_options: options of the samplers that take them (``SAMPLERS[name].options``).
    guidance_scale: classifier-free guidance at scale w, pred = pred_uncond + w (pred_cond - pred_uncond) (w = 1:
        the conditional model, w = 0: the unconditional one), both branches in one batched network call;
        the null condition is the denoiser's (``D.null_cond``, what its network was trained with).
        guidance_rescale: Lin et al.'s rescale in [0, 1] (diffusers' ``guidance_rescale``); guidance_interval:
        (sigma_lo, sigma_hi), guide only where sigma_lo < sigma <= sigma_hi (Kynkaanniemi et al. 2024).
        :class:`~diffusion_forge.ClassifierFreeGuidance`; the x0 clamps apply on top of it.
    scheduler: a diffusers scheduler instead of ``sampler``: runs its own loop
        (:func:`diffusion_forge.interop.schedulers.sample_with_scheduler`, the same callback contract).
    precision: "no" (default: the network in its own dtype), "bf16", "fp16" (CUDA only) or "auto" (bf16 where
        the hardware has it, else "no"): only the network's forward runs under ``torch.autocast`` in that
        dtype (:func:`~diffusion_forge.denoise.denoiser.network_autocast`); its output is cast back, so the
        sigmas, the noise and the samplers' updates keep their float64 (float32 on MPS) arithmetic.
    noise: the fresh noise of stochastic samplers: "independent" (default: a new draw at every step, as diffusers'
        schedulers) or "brownian" (the step's increment of one Brownian path per seed, in SNR time,
        :class:`~diffusion_forge.sampling.brownian.BrownianNoise`): the same distribution of samples, but a seed
        then gives nearly the same image at every step count, converging as the steps grow.
    Returns a tensor of ``shape`` in the denoiser's space, in ``dtype`` (default: the network's dtype).
    """
    if isinstance(model, DenoiserBase):
        D = as_denoiser(model, schedule, prediction)
        device, _ = model_device_dtype(D, device, None)
        dtype = dtype or D.model_dtype
    else:
        device, dtype = model_device_dtype(model, device, dtype)
        D = as_denoiser(model, schedule, prediction, model_dtype=dtype)
    shape, cond = _check_shape(shape), check_cond(cond)
    amp = sampling_autocast_dtype(precision, device)   # None: no autocast
    if scheduler is not None:
        if sampler is not None:
            raise ValueError("pass either sampler= or scheduler=, not both")
        if guidance_scale is not None:
            raise ValueError("guidance_scale applies to our samplers; a diffusers scheduler runs the network's own "
                             "loop: pass sampler= instead of scheduler=")
        if noise != "independent":
            raise ValueError(f"noise={noise!r} applies to our samplers; a diffusers scheduler draws its own noise "
                             "at every step: pass sampler= instead of scheduler=")
        if (clip_x0 is not False and clip_x0 is not None) or dynamic_threshold is not None:
            raise ValueError("clip_x0 / dynamic_threshold apply to our samplers; a diffusers scheduler has its "
                             "own (clip_sample, thresholding in its config)")
        from ..interop.schedulers import sample_with_scheduler
        with network_autocast(D, amp):
            return sample_with_scheduler(D, scheduler, shape, steps=steps, generator=generator, callback=callback,
                                         device=device, dtype=dtype, cond=cond)
    D = apply_guidance(D, guidance_scale, guidance_rescale, guidance_interval, cond)
    D = apply_x0_wrappers(D, clip_x0, dynamic_threshold)
    name, steps, options = resolve_sampler(sampler, steps, {"eta": eta, "s_noise": s_noise, **(sampler_options or {})},
                                           samples="conditional" if cond else "unconditional")
    spec = SAMPLERS[name]
    if isinstance(sigmas, str) and sigmas not in SIGMA_GRIDS:  # a tensor / list: checked by sigma_grid
        raise ValueError(f"unknown sigmas {sigmas!r}; choose one of: {', '.join(SIGMA_GRIDS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    sched = D.schedule
    grid = sched.sigma_grid(steps, sigmas, spacing)

    noise = make_noise(noise, per_sample_generators(generator, shape[0]), shape, device, work_dtype(device))
    cond = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    denoise = functools.partial(D, **cond) if cond else D  # D(x, sigma): the samplers' view
    offset = 0

    def report(i, x, sigma, x0):
        x_t = x if math.isinf(sigma) else x / math.sqrt(1 + sigma * sigma)  # x_t = x sqrt(alpha_bar)
        callback({"step": i + offset, "x_t": x_t.to(dtype), "t": float(sched.t_for_sigma(sigma)),
                  "sigma": sigma, "x0": x0.to(dtype)})

    cb = report if callback is not None else _noop
    up_fraction = min(1.0, options.get("eta", 1.0 if spec.stochastic else 0.0))  # new noise from SNR 0
    with network_autocast(D, amp):
        x, grid = start(denoise, noise, grid, up_fraction, cb)
        offset = steps + 1 - len(grid)
        if offset and "euler_start" in options:  # the step from SNR 0 was that first-order first step
            options["euler_start"] = False
        if offset and "afs" in options:  # ... and it took the first step from pure noise, with its evaluation
            options["afs"] = False
        x = spec.fn(denoise, x, grid.tolist(), noise, cb, **options)
    return x.to(dtype)
