"""Diffusion Forge: train, sample, guide, evaluate and share diffusion models.

The public API (stable names; see shared DESIGN.md):

    import diffusion_forge as df
    sched = df.NoiseSchedule.from_name("cosine", num_timesteps=1000)
    x = df.sample(model, sched, shape=(16, 1, 28, 28), sampler="dpmpp_2m", steps=10)
"""
from .schedules import NoiseSchedule, karras_sigmas, exponential_sigmas, spaced_timesteps, rescale_zero_terminal_snr
from .process import q_sample, q_step, q_posterior, q_mean_var, convert, to_x0_eps, from_x0_eps, velocity
from .losses import (diffusion_loss, min_snr_weight, training_target, variational_bound, variational_bound_mc,
                     bits_per_dim)

__version__ = "0.1.0"


def __getattr__(name):
    # Lazily exposed so `import diffusion_forge` stays light; filled in by the modules that own them.
    if name == "sample":
        from .samplers import sample
        return sample
    raise AttributeError(f"module 'diffusion_forge' has no attribute {name!r}")
