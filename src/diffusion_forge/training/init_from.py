"""Fine-tuning: ``model.init_from`` = a diffusers UNet2DModel folder, a pipeline folder (its unet/) or a hub id.

Two hooks, one line each in training/build.py:

* :func:`adopt_process` (from ``build_schedule``, before anything else is built) gives the run the pipeline's
  training process: every ``diffusion.*`` key still at its default (schedule, num_timesteps, beta_start,
  beta_end, zero_terminal_snr, prediction) takes the value of the pipeline's scheduler config; a key set in
  the config (--set diffusion.prediction=...) is kept. A bare UNet folder has no scheduler: the config's.
* :func:`init_network` (from ``build_network``) builds the network from the UNet's own config and loads its
  weights: our U-Net when that config maps to ours exactly (our state dict is UNet2DModel's), else
  ``model.type=diffusers_unet`` with that config; model.type / preset / options are then unused. The data
  must fit: the same channels and image size, and a class embedding exactly when the run is class-conditional
  (K classes + 1 null class with conditioning.dropout > 0). Anything else is a ConfigError naming the fix.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from .config import Config, ConfigError

__all__ = ["adopt_process", "init_network", "load_unet"]
_CACHE: dict[str, tuple] = {}
PROCESS_KEYS = ("schedule", "num_timesteps", "beta_start", "beta_end", "zero_terminal_snr", "prediction")


def load_unet(source: str):
    """(UNet2DModel, scheduler config dict or None) of a UNet folder, pipeline folder or hub id (cached)."""
    if source in _CACHE:
        return _CACHE[source]
    folder = Path(source).expanduser()
    config = folder / "config.json"
    if folder.is_dir() and config.is_file() and not (folder / "model_index.json").is_file():
        cls = json.loads(config.read_text()).get("_class_name")
        if cls != "UNet2DModel":
            raise ConfigError(f"model.init_from={source}: {config} describes a {cls}; fine-tuning takes a "
                              "UNet2DModel folder or a pipeline with one (DDPMPipeline, DDIMPipeline)")
        import diffusers

        found = (diffusers.UNet2DModel.from_pretrained(folder, use_safetensors=True), None)
    else:
        from ..interop.pipelines import load_pipeline

        try:
            D = load_pipeline(source, device="cpu")
        except ValueError as e:
            raise ConfigError(f"model.init_from={source}: {e}") from None
        backbone = D.model.backbone
        if type(backbone).__name__ != "UNet2DModel":
            raise ConfigError(f"model.init_from={source}: its network is a {type(backbone).__name__}; fine-tuning "
                              "takes a UNet2DModel (DDPMPipeline, DDIMPipeline, LDMPipeline, exported runs)")
        found = (backbone, dict(D.scheduler.config))
    _CACHE[source] = found
    return found


def adopt_process(cfg: Config) -> None:
    """Set the diffusion keys left at their defaults to the pipeline's (see the module docstring); in place."""
    source = cfg.model.init_from
    if not source:
        return
    _, sched = load_unet(source)
    if sched is None:
        return
    from ..core.schedules import NoiseSchedule

    schedule = NoiseSchedule.from_diffusers(sched)
    if schedule.name == "custom":
        raise ConfigError(f"model.init_from={source}: its scheduler has custom trained_betas, which the config cannot "
                          "name; set diffusion.schedule and its betas explicitly")
    theirs = {"schedule": schedule.name, "num_timesteps": schedule.num_timesteps,
              "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
              "zero_terminal_snr": schedule.zero_terminal_snr, "prediction": sched.get("prediction_type") or "epsilon"}
    defaults = {f.name: f.default for f in dataclasses.fields(type(cfg.diffusion))}
    for key in PROCESS_KEYS:
        if getattr(cfg.diffusion, key) == defaults[key]:
            setattr(cfg.diffusion, key, theirs[key])


def _our_config(c) -> dict:
    """Our U-Net options read off a UNet2DModel config (checked afterwards by round-tripping)."""
    downs = list(c.down_block_types)
    return dict(sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
                block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
                attention_levels=tuple(i for i, t in enumerate(downs) if t == "AttnDownBlock2D"),
                mid_attention=bool(c.add_attention), attention_head_dim=c.attention_head_dim,
                norm_num_groups=c.norm_num_groups, norm_eps=c.norm_eps, dropout=c.dropout,
                num_class_embeds=c.num_class_embeds)


def _as_ours(unet):
    """Our U-Net with the UNet2DModel's weights when its config maps to ours exactly, else None."""
    from ..models import UNet

    try:
        ours = UNet(**_our_config(unet.config))
    except (ValueError, TypeError):
        return None
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    if any(norm(v) != norm(unet.config.get(k, v)) for k, v in ours.to_diffusers_config().items()):
        return None
    ours.load_state_dict(unet.state_dict())
    ours.build_config = {"type": "unet", **{k: list(v) if isinstance(v, tuple) else v for k, v in ours.config.items()}}
    return ours


def _check_fit(source: str, c, sample_shape, wanted_classes: int) -> None:
    if len(sample_shape) != 3:
        raise ConfigError(f"model.init_from={source} is an image U-Net and the data's items have shape "
                          f"{tuple(sample_shape)}")
    channels, size = sample_shape[0], sample_shape[-1]
    if c.in_channels != channels:
        raise ConfigError(f"model.init_from={source} takes {c.in_channels}-channel images and the data have "
                          f"{channels}; set data.channels={c.in_channels}")
    own = c.sample_size if isinstance(c.sample_size, int) else (c.sample_size or [None])[-1]
    if own is not None and own != size:
        raise ConfigError(f"model.init_from={source} was trained on {own}x{own} images and the data are "
                          f"{size}x{size}; set data.image_size={own}")
    have = c.num_class_embeds or 0
    if have != wanted_classes:
        if not have:
            raise ConfigError(f"model.init_from={source} is unconditional; fine-tune it with conditioning.kind=none")
        if not wanted_classes:
            raise ConfigError(f"model.init_from={source} is class-conditional ({have} class embeddings); fine-tune it "
                              "with conditioning.kind=class")
        raise ConfigError(f"model.init_from={source} has {have} class embeddings and this run needs {wanted_classes} "
                          "(K classes + 1 null class with conditioning.dropout > 0); match conditioning.num_classes")


def init_network(cfg: Config, sample_shape, schedule, num_classes: int = 0):
    """(network with the pretrained weights, its build config), carrying ``diffusion_config`` as build_network's."""
    from ..models import build_model
    from .build import diffusion_config, null_class

    source = cfg.model.init_from
    unet, _ = load_unet(source)
    wanted = num_classes + int(null_class(cfg, num_classes) is not None) if num_classes else 0
    _check_fit(source, unet.config, sample_shape, wanted)
    model = _as_ours(unet)
    if model is None:
        config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        model = build_model({"type": "diffusers_unet", **config})
        model.unet.load_state_dict(copy.deepcopy(unet.state_dict()))
    model.diffusion_config = diffusion_config(schedule, cfg, sample_shape, num_classes)
    return model, model.build_config
