"""The EMA of the weights moved to :mod:`diffusion_forge.training.ema`; this name keeps old imports working."""
from .training.ema import EMA, ema_decay

__all__ = ["EMA", "ema_decay"]
