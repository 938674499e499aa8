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

**Stable Diffusion** (a StableDiffusionPipeline folder or hub id: a ``UNet2DConditionModel``): the run is a latent
text run in the pipeline's own spaces. :func:`adopt_process` also sets, where left at their defaults,
``conditioning.kind=text`` (said once; kind=class is refused), ``data.latent`` = the pipeline's ``vae/``,
``conditioning.text_encoder`` = the pipeline folder (``models.text.load_text_encoder`` then loads its
``text_encoder/`` + ``tokenizer/``, so prompts are encoded exactly as ``encode_prompt`` does) and
``conditioning.max_length`` = its tokenizer's ``model_max_length`` (at most the encoder's positions).
:func:`check_data` (from ``TrainingData``, before the latents are encoded) wants images of the pipeline's
channels and of side ``unet.sample_size x 2^(VAE levels - 1)`` (what the VAE maps onto the U-Net's latents);
:func:`init_network` builds ``model.type=diffusers_cond_unet`` from the U-Net's config (its weights, its
cross-attention width = the text encoder's D). The loss is the usual one, on latents z = s mu(x).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from .config import Config, ConfigError

__all__ = ["adopt_process", "check_data", "init_network", "load_unet"]
_CACHE: dict[str, tuple] = {}
_NOTED: list = []
SD_KIND = "StableDiffusionPipeline"
PROCESS_KEYS = ("schedule", "num_timesteps", "beta_start", "beta_end", "zero_terminal_snr", "prediction")


def load_unet(source: str):
    """(UNet2DModel or UNet2DConditionModel, scheduler config dict or None) of a UNet folder, pipeline folder or
    hub id (cached)."""
    return _load(source)[:2]


def _pipeline_of(source: str):
    """The loaded pipeline Denoiser of a Stable Diffusion source (its .vae, .text_encoder), else None."""
    return _load(source)[2]


def _load(source: str):
    if source in _CACHE:
        return _CACHE[source]
    folder = Path(source).expanduser()
    config = folder / "config.json"
    if folder.is_dir() and config.is_file() and not (folder / "model_index.json").is_file():
        cls = json.loads(config.read_text()).get("_class_name")
        if cls != "UNet2DModel":
            raise ConfigError(f"model.init_from={source}: {config} describes a {cls}; fine-tuning takes a "
                              "UNet2DModel folder or a pipeline with one (DDPMPipeline, DDIMPipeline), or a "
                              "StableDiffusionPipeline folder")
        import diffusers

        found = (diffusers.UNet2DModel.from_pretrained(folder, use_safetensors=True), None, None)
    else:
        from ..interop.pipelines import load_pipeline

        try:
            D = load_pipeline(source, device="cpu")
        except ValueError as e:
            raise ConfigError(f"model.init_from={source}: {e}") from None
        backbone, name = D.model.backbone, type(D.model.backbone).__name__
        text = name == "UNet2DConditionModel" and D.pipeline_kind == SD_KIND
        if name != "UNet2DModel" and not text:
            raise ConfigError(f"model.init_from={source}: its network is a {name} of a {D.pipeline_kind}; fine-tuning "
                              "takes a UNet2DModel (DDPMPipeline, DDIMPipeline, LDMPipeline, exported runs) or a "
                              "StableDiffusionPipeline")
        found = (backbone, dict(D.scheduler.config), D if text else None)
    _CACHE[source] = found
    return found


def _adopt_text(cfg: Config, source: str, D) -> None:
    """A Stable Diffusion source: conditioning.kind=text, its VAE, text encoder and prompt length (the keys left
    at their defaults; see the module docstring)."""
    c = cfg.conditioning
    if c.kind in ("class", "cluster"):
        raise ConfigError(f"model.init_from={source} is a Stable Diffusion U-Net, conditioned on text: fine-tune it "
                          "with --conditioning text on captioned data (a folder with a metadata.jsonl)")
    if c.kind != "text":
        c.kind = "text"
        if not _NOTED:
            _NOTED.append(True)
            print(f"note: model.init_from={source} is a StableDiffusionPipeline: training with conditioning.kind=text "
                  "(captions), in its VAE's latent space, with its text encoder")
    folder = Path(source).expanduser()
    local = folder.is_dir()
    defaults = {f.name: f.default for f in dataclasses.fields(type(c))}
    if not cfg.data.latent:
        cfg.data.latent = str((folder / "vae").resolve()) if local else source
    if c.text_encoder == defaults["text_encoder"]:
        c.text_encoder = str(folder.resolve()) if local else _hub_snapshot(source)
    if c.max_length == defaults["max_length"]:
        c.max_length = int(D.text_encoder.max_length)
def _hub_snapshot(repo_id: str) -> str:
    """The local snapshot folder of a hub pipeline that load_pipeline has just downloaded (its text_encoder/ and
    tokenizer/ are there)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError) as e:  # not (all of it) in the cache: LocalEntryNotFoundError
        raise ConfigError(f"model.init_from={repo_id}: its text encoder is not in the local hub cache ({type(e).__name__}); "
                          "download the pipeline to a folder (save_pretrained) and pass that folder") from None


def adopt_process(cfg: Config) -> None:
    """Set the diffusion keys left at their defaults to the pipeline's (see the module docstring); in place."""
    source = cfg.model.init_from
    if not source:
        return
    _, sched, pipeline = _load(source)
    if pipeline is not None:
        _adopt_text(cfg, source, pipeline)
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


def _uses_pipeline_vae(cfg: Config, source: str) -> bool:
    latent, folder = str(cfg.data.latent or ""), Path(source).expanduser()
    if latent == source:
        return True
    if not folder.is_dir() or not latent:
        return False
    return Path(latent).expanduser().resolve() in (folder.resolve(), (folder / "vae").resolve())


def check_data(cfg: Config, ds) -> None:
    """A Stable Diffusion source: the pixel data set ``ds`` must have the VAE's channels and the image side
    ``unet.sample_size x 2^(VAE levels - 1)``; one ConfigError line naming the fix (other sources: nothing)."""
    source = cfg.model.init_from
    if not source or _load(source)[2] is None or not _uses_pipeline_vae(cfg, source):
        return
    from ..models.vae import downsample_factor

    unet, _, D = _load(source)
    shape = tuple(getattr(ds, "shape", None) or ds[0][0].shape)
    if len(shape) != 3:
        raise ConfigError(f"model.init_from={source} is a Stable Diffusion pipeline, for images, and the data's items "
                          f"have shape {shape}")
    channels, want = int(D.vae.config.in_channels), int(unet.config.sample_size) * downsample_factor(D.vae)
    if shape[0] != channels:
        raise ConfigError(f"model.init_from={source}: its VAE encodes {channels}-channel images and the data have "
                          f"{shape[0]}; set data.channels={channels}")
    if shape[-1] != want or shape[-2] != want:
        raise ConfigError(f"model.init_from={source} works on {want}x{want} images (U-Net sample_size "
                          f"{unet.config.sample_size} x VAE downsampling {downsample_factor(D.vae)}) and the data are "
                          f"{shape[-2]}x{shape[-1]}; set data.image_size={want}")


def _init_text(cfg: Config, unet, sample_shape, schedule, text_encoder):
    """The Stable Diffusion U-Net as model.type=diffusers_cond_unet with its weights; latents and the text
    encoder's width must fit it."""
    from ..models import build_model
    from .build import diffusion_config

    source, c = cfg.model.init_from, unet.config
    if text_encoder is None:
        raise ConfigError(f"model.init_from={source} is a Stable Diffusion U-Net: fine-tune it with --conditioning "
                          "text on captioned data")
    if tuple(sample_shape) != (c.in_channels, c.sample_size, c.sample_size):
        raise ConfigError(f"model.init_from={source} takes latents of shape ({c.in_channels}, {c.sample_size}, "
                          f"{c.sample_size}) and data.latent={cfg.data.latent} gives {tuple(sample_shape)}; leave "
                          "data.latent unset (the pipeline's VAE) and set data.image_size to fit")
    if text_encoder.dim != c.cross_attention_dim:
        raise ConfigError(f"model.init_from={source} attends to {c.cross_attention_dim}-wide token states and "
                          f"conditioning.text_encoder={text_encoder.name} gives {text_encoder.dim}; leave "
                          "conditioning.text_encoder unset (the pipeline's own)")
    config = {k: v for k, v in dict(c).items() if not k.startswith("_")}
    model = build_model({"type": "diffusers_cond_unet", **config})
    model.load_state_dict(copy.deepcopy(unet.state_dict()))
    model.diffusion_config = diffusion_config(schedule, cfg, sample_shape, 0, text_encoder)
    return model, model.build_config


def init_network(cfg: Config, sample_shape, schedule, num_classes: int = 0, text_encoder=None):
    """(network with the pretrained weights, its build config), carrying ``diffusion_config`` as build_network's."""
    from ..models import build_model
    from .build import diffusion_config, null_class

    source = cfg.model.init_from
    unet, _ = load_unet(source)
    if type(unet).__name__ == "UNet2DConditionModel":
        return _init_text(cfg, unet, sample_shape, schedule, text_encoder)
    if text_encoder is not None:
        raise ConfigError(f"model.init_from={source} is a UNet2DModel, without cross-attention to text: fine-tune it "
                          "with conditioning.kind=none (or class, if it has class embeddings), or start from a "
                          "StableDiffusionPipeline")
    wanted = num_classes + int(null_class(cfg, num_classes) is not None) if num_classes else 0
    _check_fit(source, unet.config, sample_shape, wanted)
    model = _as_ours(unet)
    if model is None:
        config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        model = build_model({"type": "diffusers_unet", **config})
        model.unet.load_state_dict(copy.deepcopy(unet.state_dict()))
    model.diffusion_config = diffusion_config(schedule, cfg, sample_shape, num_classes)
    return model, model.build_config
