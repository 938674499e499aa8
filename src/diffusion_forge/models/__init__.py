"""Denoiser networks behind one call signature: ``model(x_t, t, **cond) -> prediction`` shaped like ``x_t``.

``t`` is a float tensor (batch,) in training units [0, T-1], exactly what diffusers' ``UNet2DModel`` takes.

    from diffusion_forge.models import build_model
    model = build_model({"preset": "small", "in_channels": 1, "sample_size": 28})    # our U-Net
    model = build_model({"type": "mlp", "preset": "small", "dim": 2})                  # vectors, 2-D toy data
    model = build_model({"type": "diffusers_unet", "preset": "small"})                 # diffusers' UNet2DModel
    model = build_model({"type": "diffusers_unet", "block_out_channels": [128, 128, 256, 256, 512, 512], ...})

``model.build_config`` is the resolved, JSON-ready config: ``build_model(model.build_config)`` rebuilds it.
"""
from __future__ import annotations

import torch
from torch import nn

from .mlp import MLP_DEFAULTS, MLPDenoiser
from .cond_unet import COND_UNET_PRESETS
from .unet import UNET_DEFAULTS, UNet, timestep_embedding

__all__ = ["build_model", "list_presets", "count_parameters", "PRESETS", "UNET_DEFAULTS", "MLP_DEFAULTS",
           "UNet", "MLPDenoiser", "DiffusersUNet", "timestep_embedding"]

# Size presets per model type. U-Net levels halve the resolution, so sample_size must be divisible by
# 2 ** (levels - 1): tiny and small take 28x28 (28 -> 14 -> 7) and 32x32; base takes 32x32, 64x64, ...
PRESETS = {
    "unet": {
        "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(1,),
                     attention_head_dim=8, norm_num_groups=4),
        "small": dict(block_out_channels=(16, 32, 64), layers_per_block=1, attention_levels=(2,),
                      attention_head_dim=32, norm_num_groups=8),
        "base": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2, attention_levels=(1,),
                     attention_head_dim=64, norm_num_groups=32, dropout=0.1),
    },
    "mlp": {
        "tiny": dict(hidden=64, depth=2, time_embed_dim=32),
        "small": dict(hidden=128, depth=4, time_embed_dim=64),
        "base": dict(hidden=512, depth=6, time_embed_dim=128),
    },
}
PRESETS["diffusers_unet"] = PRESETS["unet"]  # the same architectures, built by diffusers
PRESETS["diffusers_cond_unet"] = COND_UNET_PRESETS  # UNet2DConditionModel, cross-attention to text (cond_unet.py)

PRESET_NOTES = {
    "unet": {"tiny": "for tests: builds and trains in seconds",
             "small": "the CPU demo: 28x28 MNIST in minutes on 2 cores",
             "base": "for GPUs: DDPM's CIFAR-10 network (32x32, attention at 16x16)"},
    "mlp": {"tiny": "for tests", "small": "2-D toy data on a CPU", "base": "larger vectors"},
}


class DiffusersUNet(nn.Module):
    """diffusers' ``UNet2DModel`` under our call signature; the diffusers module itself is ``.unet``."""

    def __init__(self, **unet2d_kwargs):
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(**unet2d_kwargs)

    def forward(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None, **cond) -> torch.Tensor:
        if cond:
            raise TypeError(f"UNet2DModel takes no conditioning {sorted(cond)} (only class_labels)")
        if class_labels is not None and self.unet.class_embedding is None:
            raise ValueError("class_labels given but the model was built without num_class_embeds")
        return self.unet(x, t, class_labels=class_labels).sample


def _resolve_unet_options(opts: dict) -> dict:
    """Turn the convenience keys (channel_mult + base_channels, attention_resolutions in pixels) into ours."""
    opts = dict(opts)
    if "channel_mult" in opts:
        base = opts.pop("base_channels", 32)
        opts["block_out_channels"] = tuple(base * m for m in opts.pop("channel_mult"))
    if "attention_resolutions" in opts:
        size = opts.get("sample_size")
        if size is None:
            raise ValueError("attention_resolutions (in pixels) needs sample_size; or give attention_levels")
        n_levels = len(opts.get("block_out_channels", UNET_DEFAULTS["block_out_channels"]))
        levels = [size // 2**i for i in range(n_levels)]
        res = opts.pop("attention_resolutions")
        missing = [r for r in res if r not in levels]
        if missing:
            raise ValueError(f"attention_resolutions {missing} not among this U-Net's resolutions {levels}")
        opts["attention_levels"] = tuple(levels.index(r) for r in res)
    return opts


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if not k.startswith("_")}


def build_model(config: dict | None = None) -> nn.Module:
    """A denoiser from a config: ``type`` (unet | mlp | diffusers_unet | diffusers_cond_unet), ``preset``
    (tiny | small | base), then any option of that type as an override (see ``UNET_DEFAULTS``, ``MLP_DEFAULTS``; for diffusers_unet
    without a preset, ``UNet2DModel``'s own keyword arguments)."""
    opts = dict(config or {})
    kind = opts.pop("type", "unet")
    preset = opts.pop("preset", None)
    if kind not in PRESETS:
        raise ValueError(f"unknown model type {kind!r}; choose one of: {', '.join(PRESETS)}")
    if preset is not None and preset not in PRESETS[kind]:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS[kind])}")
    base = dict(PRESETS[kind][preset]) if preset else {}

    if kind == "diffusers_cond_unet":  # diffusers' UNet2DConditionModel (text prompts through cross-attention)
        from .cond_unet import build_cond_unet

        return build_cond_unet(preset, opts)
    if kind == "mlp":
        model = MLPDenoiser(**{**base, **opts})
        model.build_config = _jsonable({"type": kind, **model.config})
    elif kind == "unet" or preset is not None:
        model = UNet(**_resolve_unet_options({**base, **opts}))
        if kind == "diffusers_unet":  # the diffusers twin of our preset
            model = DiffusersUNet(**model.to_diffusers_config())
            model.build_config = _jsonable({"type": kind, **model.unet.config})
        else:
            model.build_config = _jsonable({"type": kind, **model.config})
    else:
        model = DiffusersUNet(**opts)
        model.build_config = _jsonable({"type": kind, **model.unet.config})
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def list_presets(in_channels: int = 1) -> list[dict]:
    """One row per (type, preset): options, parameter count (U-Nets for ``in_channels`` images, MLPs for 2-D
    points; built on the meta device, so instant) and, for U-Nets, the multiple image sizes must be of."""
    rows = []
    for kind in ("unet", "mlp"):
        for name, options in PRESETS[kind].items():
            extra = dict(dim=2) if kind == "mlp" else dict(in_channels=in_channels)
            with torch.device("meta"):
                model = build_model({"type": kind, "preset": name, **extra})
            rows.append(dict(type=kind, preset=name, params=count_parameters(model), note=PRESET_NOTES[kind][name],
                             size_multiple=getattr(model, "size_multiple", None), options=_jsonable(options)))
    return rows
