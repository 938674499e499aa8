"""Export a trained run (or any loaded Denoiser) as a diffusers folder that diffusers loads as it is.

    unconditional pixel run     -> DDPMPipeline: model_index.json, unet/ (UNet2DModel), scheduler/
    class-conditional run       -> unet/ (UNet2DModel with num_class_embeds = K [+ 1 null class]) + scheduler/
                                   + dforge.json (classes, null class, the class shares p(c); a cluster run:
                                   conditioning "cluster"); the card holds a ten-line sampling loop
    latent run (``D.vae``)      -> LDMPipeline (vqvae/ = the AutoencoderKL; LDMPipeline decodes z / scaling_factor)
    latent text run (``D.vae`` and ``D.text_encoder``) -> StableDiffusionPipeline: unet/, vae/, text_encoder/,
                                   tokenizer/, scheduler/ (the text encoder's config records use_attention_mask,
                                   its tokenizer model_max_length, so encode_prompt feeds prompts as training did)

The scheduler is a ``DDPMScheduler`` with the run's training process (``NoiseSchedule.to_diffusers_config``:
betas, num_train_timesteps, rescale_betas_zero_snr), ``prediction_type`` = the run's prediction,
``clip_sample=False`` and ``timestep_spacing="trailing"``, so the pipeline's DDPM loop is our ``ddpm`` sampler
(tests/test_export.py checks the round trip). The weights are the EMA average (``use_ema``), as the card says.
Written into ``DIR.tmp`` and renamed into place once complete; an existing DIR is refused without ``force``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

__all__ = ["export_run", "export_denoiser", "diffusers_backbone", "export_scheduler", "export_kind"]


def diffusers_backbone(network):
    """The diffusers model behind a network: our U-Net converted to the UNet2DModel with its exact state dict,
    a text run's U-Net (a UNet2DConditionModel subclass) to the plain UNet2DConditionModel, or the diffusers
    module a wrapper holds (``.unet``, ``.backbone``)."""
    import diffusers
    from diffusers import ModelMixin

    if hasattr(network, "to_diffusers_config"):
        cls = diffusers.UNet2DConditionModel if isinstance(network, diffusers.UNet2DConditionModel) else diffusers.UNet2DModel
        unet = cls(**network.to_diffusers_config())
        unet.load_state_dict({k: v.detach().cpu() for k, v in network.state_dict().items()})
        return unet
    for attr in ("unet", "backbone", "transformer"):
        module = getattr(network, attr, None)
        if isinstance(module, ModelMixin):
            return module
    raise ValueError(f"cannot export a {type(network).__name__} network as a diffusers model (our U-Net and "
                     "diffusers' UNet2DModel / UNet2DConditionModel can be exported)")


def export_scheduler(D):
    """A DDPMScheduler of D's training process and prediction type (see the module docstring)."""
    import diffusers

    return diffusers.DDPMScheduler(**D.schedule.to_diffusers_config(), prediction_type=D.prediction,
                                   clip_sample=False, timestep_spacing="trailing")


def export_kind(D) -> str:
    if getattr(D, "text_encoder", None) is not None:
        if getattr(D, "vae", None) is None:
            raise ValueError("a text run in pixel space cannot be a StableDiffusionPipeline (it needs a VAE): train "
                             "it with data.latent set")
        return "StableDiffusionPipeline"
    if getattr(D, "vae", None) is not None:
        return "LDMPipeline"
    return "unet+scheduler" if getattr(D, "num_classes", None) else "DDPMPipeline"


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; --out names the folder to write")


def _sample_grid(D, path: Path, settings: dict) -> str:
    """A grid of 16 samples (seeds 0..15) into ``path``: classes i mod K, the run's sampler and guidance."""
    from ..sampling.generate import generate
    from ..sampling.registry import resolve_sampler
    from ..viz import save_samples

    n, k = settings.get("n", 16), int(getattr(D, "num_classes", None) or 0)
    cond, labels = {}, None
    if getattr(D, "text_encoder", None) is not None:
        prompts = list(settings.get("prompts") or [""])
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        cond = {"encoder_hidden_states": D.text_encoder.encode(prompts)}
    elif k and settings.get("clusters"):   # a cluster run: clusters drawn from their shares, like the data
        from ..sampling.generate import data_class_labels

        cond = {"class_labels": data_class_labels(D.class_frequencies, n, seed=0)}
    elif k:
        cond, labels = {"class_labels": torch.arange(n) % k}, [f"class {i % k}" for i in range(n)]
    w = getattr(D, "guidance_scale", None) if D.null_cond else None
    # the run's sampler, or the rule `dforge sample RUN` applies to these samples (clusters drawn like the data)
    samples = "data" if k and settings.get("clusters") else "conditional" if cond else "unconditional"
    name, steps, options = resolve_sampler(settings.get("sampler", "dpmpp_2m"), settings.get("steps", 20),
                                           settings.get("options") or {}, samples)
    x = generate(D, n, seed=0, sampler=name, steps=steps, sampler_options=options, cond=cond,
                 guidance_scale=w)   # decoded images
    save_samples(x, path, raw=True)
    what = f"{name}{f' {options}' if options else ''}, {steps} steps, seeds 0..{n - 1}"
    clusters = ", clusters drawn from their shares p(c)" if k and settings.get("clusters") else ""
    return what + (f", CFG w = {w:g}" if w else "") + (", classes i mod K by row order" if labels else clusters)


def export_denoiser(D, out, force: bool = False, config: dict | None = None, metrics=(), name: str | None = None,
                    ema: bool = True, ema_decay=None, license: str = "apache-2.0", samples: bool = True,
                    prompts=None) -> Path:
    """Write D as a diffusers folder ``out`` (see the module docstring); returns the folder."""
    import diffusers

    from ..io.files import write_json
    from ..io.files import atomic_write_text
    from .card import model_card

    out = Path(out)
    _check_out(out, force)
    kind, config = export_kind(D), dict(config or {})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)          # left by an export that was killed
    unet, scheduler = diffusers_backbone(D.model), export_scheduler(D)
    num_classes = int(getattr(D, "num_classes", None) or 0)
    conditioning = (config.get("conditioning") or {}).get("kind")      # "cluster": ids are k-means clusters
    try:
        tmp.mkdir(parents=True)
        if kind == "DDPMPipeline":
            diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        elif kind == "LDMPipeline":
            diffusers.LDMPipeline(vqvae=D.vae, unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        elif kind == "StableDiffusionPipeline":
            _save_sd(D, unet, scheduler, tmp)
        else:
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
            scheduler.save_pretrained(tmp / "scheduler")
            null = (D.null_cond or {}).get("class_labels")
            write_json(tmp / "dforge.json", {"num_classes": num_classes, "null_class": null,
                                             "guidance_scale": getattr(D, "guidance_scale", None),
                                             "step": getattr(D, "step", None), "conditioning": conditioning,
                                             "class_frequencies": getattr(D, "class_frequencies", None)})
        sample_cfg = dict((config.get("sample") or {}), prompts=prompts, clusters=conditioning == "cluster")
        note = _sample_grid(D, tmp / "samples.png", sample_cfg) if samples else None
        info = {"name": name or out.name, "step": getattr(D, "step", None), "sample_shape": list(D.sample_shape),
                "num_classes": num_classes, "clusters": conditioning == "cluster",
                "schedule": D.schedule.to_dict(), "prediction": D.prediction,
                "scheduler": type(scheduler).__name__, "ema": ema,
                "ema_decay": ema_decay or (config.get("ema") or {}).get("decay"),
                "samples": "samples.png" if samples else None, "samples_note": f"Samples: {note}." if note else ""}
        atomic_write_text(tmp / "README.md", model_card(kind, config, info, list(metrics), license))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_sd(D, unet, scheduler, folder: Path) -> None:
    import diffusers

    text, vae = D.text_encoder, D.vae
    tokenizer, model = text.tokenizer, text.model
    max_length = int(getattr(text, "max_length", None) or tokenizer.model_max_length)
    tokenizer.model_max_length = max_length
    use_mask = bool(getattr(text, "use_attention_mask", getattr(model.config, "use_attention_mask", False)))
    model.config.use_attention_mask = use_mask          # encode_prompt passes the mask iff this is set
    latent = D.sample_shape
    if getattr(unet.config, "sample_size", None) is None:
        unet.register_to_config(sample_size=int(latent[-1]))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=model, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def _replace(tmp: Path, out: Path) -> None:
    """Rename tmp onto out; an existing out (force) is moved aside first and removed after."""
    aside = None
    if out.exists():
        aside = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, aside)
    os.replace(tmp, out)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def export_run(run, out, force: bool = False, use_ema: bool = True, license: str = "apache-2.0",
               samples: bool = True, prompts=None) -> Path:
    """Export a run folder of ``dforge train`` (its newest checkpoint) as a diffusers folder (module docstring)."""
    from ..io.checkpoint import load_model_from_run
    from ..io.runs import read_metrics

    out = Path(out)
    here, there = Path(run).resolve(), out.resolve()
    if there == here or here in there.parents or there in here.parents:
        raise ValueError(f"--out {out} would overlap the run folder {run} (--force would replace the run itself); "
                         "export to a folder outside it")
    _check_out(out, force)                          # before loading anything
    D = load_model_from_run(run, use_ema=use_ema)
    ema = use_ema and D.checkpoint_path is not None and (Path(D.checkpoint_path) / "ema.safetensors").is_file()
    return export_denoiser(D, out, force=force, config=D.config, metrics=read_metrics(run), name=Path(run).resolve().name,
                           ema=ema, license=license, samples=samples, prompts=prompts)
