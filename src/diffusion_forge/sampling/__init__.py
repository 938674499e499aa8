"""Samplers over a denoiser and a sigma grid."""
