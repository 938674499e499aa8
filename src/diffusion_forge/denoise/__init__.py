"""Denoisers: D(x, sigma, **cond) -> x0 over a network, and wrappers over denoisers."""
from .denoiser import ClipX0, Denoiser, DenoiserBase, DenoiserWrapper, DynamicThreshold, as_denoiser

__all__ = ["Denoiser", "DenoiserBase", "DenoiserWrapper", "ClipX0", "DynamicThreshold", "as_denoiser"]
