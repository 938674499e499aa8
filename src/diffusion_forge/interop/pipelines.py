"""Pretrained diffusers pipelines as Denoisers: ``load_pipeline(path_or_hub_id) -> Denoiser``.

A pipeline's U-Net (or DiT transformer) ``net`` becomes the network ``model(x_t, t, **cond) = net(x_t, t, ...).sample``
of a :class:`~diffusion_forge.Denoiser`, with the training process read from its scheduler config
(``NoiseSchedule.from_diffusers``: betas / beta_schedule / trained_betas, num_train_timesteps,
rescale_betas_zero_snr) and ``prediction = scheduler.config.prediction_type``. So D(x, sigma) = E[x_0 | x] exactly
as the pipeline's own scheduler reads the network, and every sampler, guidance wrapper and entry point of the
toolkit treats a pipeline like a trained run. Attached as plain attributes (not submodules: the Denoiser's
state_dict stays the network's): ``.vae`` (AutoencoderKL / VQModel, or None for pixel pipelines; latents are
``z * scaling_factor``, so ``decode(z / scaling_factor)`` gives images in [-1, 1]; ``sampling.generate`` decodes),
``.text_encoder`` (for Stable Diffusion a ``models.text.TextEncoder`` over the pipeline's tokenizer and text
encoder: ``encode(prompts)`` equals ``encode_prompt``'s embeddings; else None), ``.pipeline_kind``, ``.pipeline`` (the diffusers
pipeline itself, for its own loop), ``.num_classes``, ``.guidance_scale`` (the pipeline's default CFG scale).

Kinds: DDPMPipeline, DDIMPipeline (pixels), StableDiffusionPipeline (latents, text: null_cond is the empty
prompt's embedding), LDMPipeline (unconditional latents, VQ-VAE), DiTPipeline (class-conditional latents, null
class 1000; the learned-variance half of DiT's output is dropped), and "unet+scheduler" folders
(``unet/`` + ``scheduler/`` without model_index.json, as ``dforge export`` writes for class-conditional runs).

Safety: model_index.json is read first; every component must be a class of ``diffusers`` or ``transformers``
(no custom or remote code is ever run) and weights load with ``use_safetensors=True``.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_pipeline", "PipelineNetwork", "SUPPORTED", "read_model_index",
           "check_trusted", "hub_error", "is_offline"]

# pipeline class -> (backbone attribute, vae attribute or None, default CFG scale or None)
SUPPORTED = {
    "DDPMPipeline": ("unet", None, None),
    "DDIMPipeline": ("unet", None, None),
    "StableDiffusionPipeline": ("unet", "vae", 7.5),
    "LDMPipeline": ("unet", "vqvae", None),
    "DiTPipeline": ("transformer", "vae", 4.0),
}
UNET_FOLDER = "unet+scheduler"
TRUSTED_LIBRARIES = ("diffusers", "transformers")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DIT_NULL_CLASS = 1000


class PipelineNetwork(nn.Module):
    """A diffusers backbone under our call signature ``model(x_t, t, **cond)``; the module itself is
    ``.backbone``. DiT transformers with learned variance (out_channels = 2 x in_channels) return their first
    half, the epsilon prediction (as DiTPipeline does)."""

    def __init__(self, backbone: nn.Module, kind: str):
        super().__init__()
        self.backbone, self.kind = backbone, kind

    def forward(self, x: torch.Tensor, t, class_labels=None, encoder_hidden_states=None) -> torch.Tensor:
        if self.kind == "transformer":
            out = self.backbone(x, timestep=t, class_labels=class_labels).sample
            return out[:, :x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out
        if encoder_hidden_states is not None or self.kind == "cond_unet":
            if encoder_hidden_states is None:
                raise ValueError("this U-Net is text-conditional: pass cond={'encoder_hidden_states': ...} "
                                 "(prompts through D.text_encoder.encode)")
            return self.backbone(x, t, encoder_hidden_states=encoder_hidden_states).sample
        return self.backbone(x, t, class_labels=class_labels).sample


# ---------------------------------------------------------------------------------------------
# Where the pipeline lives, and whether it is safe to load

def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


NETWORK_ERRORS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectError",
                  "ConnectTimeout", "Timeout", "TimeoutException", "NetworkError", "RepositoryNotFoundError",
                  "GatedRepoError", "EntryNotFoundError", "RemoteEntryNotFoundError", "HfHubHTTPError")


def hub_error(e: BaseException) -> bool:
    """Whether an exception is the hub's: offline, no connection, no such repository or file."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & set(NETWORK_ERRORS))


def _hub_message(repo_id: str, what: str, e: BaseException) -> str:
    if is_offline() or "offline" in type(e).__name__.lower() or "LocalEntryNotFound" in type(e).__name__:
        return (f"cannot load {repo_id!r} from the Hugging Face hub: offline (HF_HUB_OFFLINE is set or there is no "
                f"connection) and it is not in the local cache; run once with network access, or pass a local folder")
    return f"cannot load {what} of {repo_id!r} from the Hugging Face hub ({type(e).__name__}); check the name and the connection"


def read_model_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder / 'model_index.json'} is unreadable ({e}); is this a diffusers pipeline folder?") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ValueError(f"{folder / 'model_index.json'} names no pipeline class (_class_name)")
    return index


def check_trusted(index: dict, where: str) -> str:
    """The pipeline class of a model_index.json, refusing custom or remote code and unsupported kinds."""
    kind = index["_class_name"]
    if index.get("_custom_pipeline") or isinstance(kind, (list, tuple)):
        raise ValueError(f"{where} is a custom pipeline ({kind!r}); diffusion_forge never runs custom pipeline "
                         f"code: use one of {', '.join(SUPPORTED)}")
    for name, entry in index.items():
        if name.startswith("_") or entry is None or not isinstance(entry, (list, tuple)) or entry == [None, None]:
            continue
        library, cls = entry
        if library not in TRUSTED_LIBRARIES or not hasattr(importlib.import_module(library), str(cls)):
            raise ValueError(f"{where}: component {name!r} is {library}.{cls}, not a class of diffusers or "
                             "transformers; diffusion_forge never runs custom or remote code")
    if kind not in SUPPORTED:
        raise ValueError(f"{where} is a {kind}, which diffusion_forge does not support; supported pipelines: "
                         f"{', '.join(SUPPORTED)} (and unet/ + scheduler/ folders)")
    return kind


def _local_kind(folder: Path) -> str:
    if (folder / "model_index.json").is_file():
        return check_trusted(read_model_index(folder), str(folder))
    if (folder / "unet" / "config.json").is_file() and (folder / "scheduler" / "scheduler_config.json").is_file():
        return UNET_FOLDER
    raise ValueError(f"{folder} is not a diffusers pipeline folder (no model_index.json, nor unet/ + scheduler/); "
                     "pass a folder written by save_pretrained / `dforge export`, or a hub id such as "
                     "google/ddpm-cifar10-32")


def _hub_kind(repo_id: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id, "model_index.json", local_files_only=is_offline())
    except Exception as e:
        if hub_error(e):
            raise ValueError(_hub_message(repo_id, "model_index.json", e)) from None
        raise
    return check_trusted(read_model_index(Path(path).parent), repo_id)


# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_loading():
    """No "Loading pipeline components" / "Loading weights" bars on stderr (the download bars stay)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def _from_pretrained(cls, source: str, local: bool, **kwargs):
    try:
        if not local:
            return cls.from_pretrained(source, use_safetensors=True, local_files_only=is_offline(), **kwargs)
        with _quiet_loading():
            return cls.from_pretrained(source, use_safetensors=True, local_files_only=True, **kwargs)
    except Exception as e:
        if hub_error(e) and not local:
            raise ValueError(_hub_message(source, "the weights", e)) from None
        if "safetensors" in str(e).lower() and "use_safetensors" in str(e):
            raise ValueError(f"{source} has no safetensors weights; diffusion_forge loads safetensors only "
                             "(convert the .bin files with diffusers' save_pretrained(safe_serialization=True))") from None
        raise


def _load_unet_folder(folder: Path):
    """A unet/ + scheduler/ folder: (unet, scheduler, extra) with extra from dforge.json (classes, null class)."""
    import diffusers

    config = json.loads((folder / "unet" / "config.json").read_text())
    cls_name = config.get("_class_name", "UNet2DModel")
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"{folder / 'unet'} holds a {cls_name}; expected a UNet2DModel or UNet2DConditionModel")
    unet = getattr(diffusers, cls_name).from_pretrained(folder / "unet", use_safetensors=True, local_files_only=True)
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sched_cls = sched_cfg.get("_class_name", "DDPMScheduler")
    if not hasattr(diffusers, sched_cls) or not sched_cls.endswith("Scheduler"):
        raise ValueError(f"{folder / 'scheduler'} names an unknown scheduler {sched_cls!r}")
    scheduler = getattr(diffusers, sched_cls).from_pretrained(folder / "scheduler")
    extra = {}
    if (folder / "dforge.json").is_file():
        extra = json.loads((folder / "dforge.json").read_text())
    return unet, scheduler, extra


def load_pipeline(path_or_hub_id: str | os.PathLike, device: str | torch.device | None = "cpu",
                  dtype: torch.dtype | None = None):
    """A diffusers pipeline folder or hub id as a :class:`~diffusion_forge.Denoiser` (see the module docstring).

    device: "cpu" (default), "cuda", "mps", None / "auto" (the best present). dtype: the weights' dtype
    (default float32). Hub ids download with diffusers' own ``from_pretrained`` (safetensors only); offline
    (HF_HUB_OFFLINE, or no connection) only the local cache is used, else one clear ValueError."""
    from ..device import resolve_device

    device = resolve_device(device)
    source = str(path_or_hub_id)
    folder = Path(source).expanduser()
    local = folder.exists()
    if local and not folder.is_dir():
        raise ValueError(f"{folder} is a file; pass a diffusers pipeline folder or a hub id")
    if not local and not HUB_ID.match(source):
        raise ValueError(f"no pipeline folder at {source} (it does not exist) and it is not a hub id of the form "
                         "user/name")
    kind = _local_kind(folder) if local else _hub_kind(source)
    import diffusers

    if kind == UNET_FOLDER:
        unet, scheduler, extra = _load_unet_folder(folder)
        pipe, vae, text = None, None, None
    else:
        extra = {}
        kwargs = {"safety_checker": None, "requires_safety_checker": False} if kind == "StableDiffusionPipeline" else {}
        pipe = _from_pretrained(getattr(diffusers, kind), str(folder) if local else source, local, **kwargs)
        backbone_name, vae_name, _ = SUPPORTED[kind]
        unet, scheduler = getattr(pipe, backbone_name), pipe.scheduler
        vae = getattr(pipe, vae_name) if vae_name else None
    text_model = pipe.text_encoder if kind == "StableDiffusionPipeline" else None
    for module in (unet, vae, text_model):
        if module is not None:
            module.to(device, dtype).eval().requires_grad_(False)
    if pipe is not None:
        pipe.to(device)
    text = None
    if text_model is not None:
        from ..models.text import TextEncoder

        limit = int(getattr(text_model.config, "max_position_embeddings", 77))
        text = TextEncoder(source, pipe.tokenizer, text_model, min(int(pipe.tokenizer.model_max_length), limit), device)
    return _denoiser(unet, scheduler, vae, text, pipe, kind, extra, source)


def _denoiser(unet, scheduler, vae, text, pipe, kind: str, extra: dict, source: str):
    from ..core.schedules import NoiseSchedule
    from ..denoise import Denoiser

    schedule = NoiseSchedule.from_diffusers(scheduler.config)
    prediction = getattr(scheduler.config, "prediction_type", None) or "epsilon"
    cfg = unet.config
    if kind == "DiTPipeline":
        net_kind, size = "transformer", cfg.sample_size
        num_classes, null_cond = int(cfg.num_embeds_ada_norm or DIT_NULL_CLASS), {"class_labels": DIT_NULL_CLASS}
    else:
        net_kind = "cond_unet" if type(unet).__name__ == "UNet2DConditionModel" else "unet"
        size = cfg.sample_size
        num_classes = int(extra.get("num_classes") or getattr(cfg, "num_class_embeds", None) or 0)
        null_id = extra.get("null_class")
        null_cond = {"class_labels": int(null_id)} if null_id is not None else None
    size = (size, size) if isinstance(size, int) else tuple(size)
    sample_shape = (int(cfg.in_channels), *map(int, size))
    network = PipelineNetwork(unet, net_kind)
    if text is not None:
        null_cond = {"encoder_hidden_states": text.null_embedding()}   # the empty prompt, (L, D): one for all
    network.diffusion_config = {"schedule": schedule.to_dict(), "prediction": prediction, "null_cond": null_cond,
                                "sample_shape": list(sample_shape)}
    D = Denoiser(network, sample_shape=sample_shape).eval()
    default_scale = SUPPORTED.get(kind, (None, None, extra.get("guidance_scale")))[2]
    attached = dict(vae=vae, text_encoder=text, pipeline=pipe, pipeline_kind=kind, scheduler=scheduler,
                    num_classes=num_classes or None, source=source, step=extra.get("step"),
                    guidance_scale=default_scale if null_cond else None,
                    class_frequencies=extra.get("class_frequencies"))   # p(c) of an exported class / cluster run
    for name, value in attached.items():   # plain attributes, not submodules: D's state_dict stays the network's
        object.__setattr__(D, name, value)
    return D
