"""Denoisers: D(x, sigma, **cond) -> x0 over a network, and wrappers over denoisers (x0 clamps, guidance)."""
from .denoiser import ClipX0, Denoiser, DenoiserBase, DenoiserWrapper, DynamicThreshold, as_denoiser
from .guidance import AutoGuidance, ClassifierFreeGuidance, ClassifierGuidance

__all__ = ["Denoiser", "DenoiserBase", "DenoiserWrapper", "ClipX0", "DynamicThreshold", "as_denoiser",
           "ClassifierFreeGuidance", "ClassifierGuidance", "AutoGuidance"]
