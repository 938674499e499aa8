"""Images from a loaded pipeline (``load_pipeline``): through our samplers, or a diffusers scheduler's own loop.

Both paths draw sample i's initial noise from ``torch.Generator().manual_seed(seed + i)`` (float32, per sample,
as diffusers' ``randn_tensor`` does with a list of generators), so for the same seed, sigmas and network the two
give the same images (tests/test_pretrained.py checks it against the pipelines' own ``__call__``).

Guidance follows diffusers: classifier-free guidance runs where ``guidance_scale > 1`` (w <= 1: the conditional
model alone), pred = pred_uncond + w (pred_cond - pred_uncond), the unconditional branch being the empty prompt's
embedding (Stable Diffusion), the negative prompt's where one is given, or the null class (DiT).
Images come back as float32 CPU tensors (n, C, H, W) in [-1, 1] (latents decoded with the pipeline's VAE).
"""
from __future__ import annotations

import torch

__all__ = ["decode", "pipeline_cond", "sample_ours", "sample_scheduler", "scheduler_from_name"]


def decode(D, z: torch.Tensor) -> torch.Tensor:
    """Latents z (= scaling_factor x the VAE's latents) -> images in [-1, 1] (``models.vae.decode_latents``);
    pixels pass through."""
    vae = getattr(D, "vae", None)
    if vae is None:
        return z
    from ..models.vae import decode_latents

    return decode_latents(vae, z)


def _one(text, what: str):
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{what} must be one string (used for every image), got {type(text).__name__}")
    return text


def pipeline_cond(D, n: int, prompt: str | list[str] | None = None, negative_prompt: str | None = None,
                  class_label: int | None = None) -> tuple[dict, dict | None]:
    """(cond of n samples, the null condition of classifier-free guidance) for a loaded pipeline."""
    text = getattr(D, "text_encoder", None)
    if text is not None:
        prompts = [prompt or ""] * n if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"give one prompt or one per image ({n}), got {len(prompts)}")
        if class_label is not None:
            raise ValueError("this is a text-to-image pipeline: pass --prompt, not --class")
        from ..models.text import prompt_cond

        return prompt_cond(D, prompts, _one(negative_prompt, "negative_prompt"))
    if prompt is not None or negative_prompt is not None:
        raise ValueError(f"{D.pipeline_kind} takes no prompt (it is not a text-to-image pipeline); drop --prompt")
    if class_label is not None:
        k = getattr(D, "num_classes", None)
        if not k:
            raise ValueError(f"{D.pipeline_kind} is unconditional: drop --class")
        if not 0 <= int(class_label) < k:
            raise ValueError(f"class {class_label} is out of range: the model knows classes 0..{k - 1}")
        return {"class_labels": torch.full((n,), int(class_label), dtype=torch.long)}, D.null_cond
    if getattr(D, "num_classes", None):
        raise ValueError(f"{D.pipeline_kind} is class-conditional ({D.num_classes} classes): pass --class N")
    return {}, None


def _guided(D, guidance_scale, null):
    from ..denoise.guidance import ClassifierFreeGuidance

    if guidance_scale is None or guidance_scale <= 1 or null is None:
        return D
    return ClassifierFreeGuidance(D, guidance_scale, null_cond=null)


def sample_ours(D, n: int, seed: int = 0, sampler: str = "dpmpp_2m", steps: int = 25, prompt=None,
                negative_prompt: str | None = None, class_label: int | None = None, guidance_scale: float | None = None,
                sigmas: str = "default", spacing: str = "trailing", sampler_options: dict | None = None,
                batch_size: int = 16, progress: bool = False, decode_latents: bool = True,
                noise: str = "independent") -> torch.Tensor:
    """n images through our sampler (``sampling.generate``), guided as the module docstring says; ``noise``:
    "independent" or "brownian" (as :func:`diffusion_forge.sample`)."""
    from ..sampling.generate import generate

    cond, null = pipeline_cond(D, n, prompt, negative_prompt, class_label)
    return generate(_guided(D, guidance_scale, null), n, seed=seed, sampler=sampler, steps=steps, cond=cond,
                    sampler_options=sampler_options, sigmas=sigmas, spacing=spacing, batch_size=batch_size,
                    progress=progress, decode=decode_latents, noise=noise)   # generate decodes latents with D.vae


def scheduler_from_name(D, name: str, **overrides):
    """The diffusers scheduler ``name`` configured from the pipeline's own scheduler config (its betas,
    prediction type, ...), with ``overrides`` (e.g. timestep_spacing="trailing")."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler") or not hasattr(cls, "from_config"):
        known = sorted(c for c in dir(diffusers) if c.endswith("Scheduler") and not c.startswith(("Flax", "Scheduler")))
        raise ValueError(f"unknown diffusers scheduler {name!r}; e.g. {', '.join(known[:12])}, ...")
    return cls.from_config(D.scheduler.config, **overrides)


def sample_scheduler(D, scheduler, n: int, seed: int = 0, steps: int = 25, prompt=None,
                     negative_prompt: str | None = None, class_label: int | None = None,
                     guidance_scale: float | None = None, progress: bool = False) -> torch.Tensor:
    """n images through a diffusers scheduler's own loop: the pipeline's ``__call__`` (Stable Diffusion, DiT:
    with their guidance), else ``interop.schedulers.sample_with_scheduler`` (the loop of DDPMPipeline /
    DDIMPipeline / LDMPipeline with ``scale_model_input`` and ``init_noise_sigma``, which DDPMPipeline omits)."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    kind, pipe = D.pipeline_kind, getattr(D, "pipeline", None)
    if kind in ("StableDiffusionPipeline", "DiTPipeline"):
        pipe.set_progress_bar_config(disable=not progress)
        own, pipe.scheduler = pipe.scheduler, scheduler
        try:
            if kind == "StableDiffusionPipeline":
                prompts = [prompt or ""] * n if prompt is None or isinstance(prompt, str) else list(prompt)
                neg = None if negative_prompt is None else [_one(negative_prompt, "negative_prompt")] * n
                w = 7.5 if guidance_scale is None else guidance_scale
                out = pipe(prompt=prompts, negative_prompt=neg, num_inference_steps=steps, guidance_scale=w,
                           generator=gens, output_type="pt").images
            else:
                pipeline_cond(D, n, prompt, negative_prompt, class_label)      # the checks
                w = 4.0 if guidance_scale is None else guidance_scale
                out = torch.as_tensor(pipe(class_labels=[int(class_label)] * n, guidance_scale=w, generator=gens,
                                           num_inference_steps=steps, output_type="np").images).permute(0, 3, 1, 2)
        finally:
            pipe.scheduler = own
        return out.float().cpu() * 2 - 1                              # [0, 1] -> [-1, 1]
    from ..sampling.api import sample

    cond, _ = pipeline_cond(D, n, prompt, negative_prompt, class_label)
    if guidance_scale is not None and guidance_scale > 1:
        raise ValueError(f"a diffusers scheduler runs {kind}'s own loop, which has no classifier-free guidance; "
                         "use --sampler for guidance")
    z = sample(D, shape=(n, *D.sample_shape), scheduler=scheduler, steps=steps, generator=gens, cond=cond)
    return decode(D, z.float().cpu())
