"""Diffusion Forge: train, sample, guide, evaluate and share diffusion models.

The public API (stable names; see shared DESIGN.md):

    import diffusion_forge as df
    sched = df.NoiseSchedule.from_name("cosine", num_timesteps=1000)
    x = df.sample(model, sched, shape=(16, 1, 28, 28), sampler="dpmpp_2m", steps=10)
    D = df.Denoiser(model, sched, prediction="v_prediction")      # the object underneath
    x = df.sample(df.ClipX0(D), shape=(16, 1, 28, 28), cond={"class_labels": y})
"""
from .core.schedules import NoiseSchedule, karras_sigmas, exponential_sigmas, spaced_timesteps, rescale_zero_terminal_snr
from .core.process import (q_sample, q_step, q_posterior, q_mean_var, convert, to_x0_eps, from_x0_eps, velocity,
                           check_prediction_at_snr0)
from .core.losses import (diffusion_loss, min_snr_weight, training_target, variational_bound, variational_bound_mc,
                     bits_per_dim)
from .denoise.denoiser import Denoiser, ClipX0, DynamicThreshold

__version__ = "0.1.0"


# Lazily exposed so `import diffusion_forge` stays light: name -> (module, attribute)
_LAZY = {
    "sample": ("sampling.api", "sample"),
    "generate": ("sampling.generate", "generate"),
    "SAMPLERS": ("sampling.registry", "SAMPLERS"),
    "resolve_sampler": ("sampling.registry", "resolve_sampler"),
    "build_model": ("models", "build_model"),
    "load_dataset": ("data", "load_dataset"),
    "TrainConfig": ("training", "TrainConfig"),
    "train": ("training", "train"),
    "load_model_from_run": ("io.checkpoint", "load_model_from_run"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'diffusion_forge' has no attribute {name!r}")
