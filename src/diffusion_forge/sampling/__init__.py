"""Sampling: the samplers (samplers.py) over a denoiser and a sigma grid, their registry and the one rule that
picks one (registry.py), the entry point ``sample`` (api.py) and the one seeded, batched loop (generate.py)."""
