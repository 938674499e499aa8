"""Diffusion Forge: train, sample, guide, evaluate and share diffusion models.

The public API (stable names; see shared DESIGN.md):

    import diffusion_forge as df
    sched = df.NoiseSchedule.from_name("cosine", num_timesteps=1000)
    x = df.sample(model, sched, shape=(16, 1, 28, 28), sampler="dpmpp_2m", steps=10)
    D = df.Denoiser(model, sched, prediction="v_prediction")      # the object underneath
    x = df.sample(df.ClassifierFreeGuidance(D, scale=3.0), shape=(16, 1, 28, 28), cond={"class_labels": y})
    x = df.sample(D, shape=(16, 1, 28, 28), cond={"class_labels": y}, guidance_scale=3.0)   # the same

Every name is imported on first use, so `import diffusion_forge` (and `dforge --help`) does not load torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module (inside this package) that defines it
_EXPORTS = {
    "core.schedules": ("NoiseSchedule", "karras_sigmas", "exponential_sigmas", "spaced_timesteps",
                       "rescale_zero_terminal_snr"),
    "core.process": ("q_sample", "q_step", "q_posterior", "q_mean_var", "convert", "to_x0_eps", "from_x0_eps",
                     "velocity", "check_prediction_at_snr0"),
    "core.losses": ("diffusion_loss", "min_snr_weight", "training_target", "variational_bound",
                    "variational_bound_mc", "bits_per_dim"),
    "denoise.denoiser": ("Denoiser", "ClipX0", "DynamicThreshold"),
    "denoise.guidance": ("ClassifierFreeGuidance", "ClassifierGuidance", "AutoGuidance"),
    "sampling.api": ("sample",),
    "sampling.generate": ("generate",),
    "sampling.registry": ("SAMPLERS", "resolve_sampler"),
    "models": ("build_model",),
    "data": ("load_dataset",),
    "training": ("TrainConfig", "train"),
    "io.checkpoint": ("load_model_from_run",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'diffusion_forge' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
