"""The model card (README.md) of an exported diffusers folder: YAML front matter the Hugging Face hub reads
(library_name, tags, pipeline_tag, license, datasets), then the recipe, the training steps, the last metrics of
metrics.jsonl, the sample grid and how to load the model."""
from __future__ import annotations

import json

__all__ = ["model_card", "front_matter", "class_loop"]

PIPELINE_TAGS = {"DDPMPipeline": "unconditional-image-generation", "unet+scheduler": "unconditional-image-generation",
                 "StableDiffusionPipeline": "text-to-image", "LDMPipeline": "unconditional-image-generation"}


def front_matter(kind: str, license: str = "apache-2.0", datasets: list[str] | None = None,
                 class_conditional: bool = False) -> str:
    tags = ["diffusers", "diffusion-forge", "pytorch", PIPELINE_TAGS[kind]]
    if class_conditional:
        tags.append("class-conditional")
    lines = ["---", "library_name: diffusers", f"license: {license}", f"pipeline_tag: {PIPELINE_TAGS[kind]}", "tags:"]
    lines += [f"- {t}" for t in tags]
    if datasets:
        lines += ["datasets:"] + [f"- {d}" for d in datasets]
    return "\n".join(lines + ["---", ""])


def class_loop(sample_shape, scheduler: str, label: int = 0, steps: int = 50) -> str:
    """The ten-line sampling loop of a class-conditional UNet2DModel (DDPMPipeline takes no labels)."""
    c, h, w = sample_shape
    return f"""```python
import torch
from diffusers import UNet2DModel, {scheduler}
unet = UNet2DModel.from_pretrained("REPO", subfolder="unet").eval()
scheduler = {scheduler}.from_pretrained("REPO", subfolder="scheduler")
scheduler.set_timesteps({steps})
labels = torch.full((4,), {label})                                   # the class of each image
x = torch.randn(4, {c}, {h}, {w}, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
for t in scheduler.timesteps:
    with torch.no_grad():
        out = unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
    x = scheduler.step(out, t, x).prev_sample
images = (x / 2 + 0.5).clamp(0, 1)                                   # N x C x H x W in [0, 1]
```"""


def _usage(kind: str, sample_shape, num_classes: int, scheduler: str, clusters: bool = False) -> str:
    if kind == "unet+scheduler" and clusters:
        return (f"A cluster-conditional `UNet2DModel`: its {num_classes} class ids are k-means clusters of the "
                f"training images (id {num_classes} is the null cluster), and `dforge.json` holds each cluster's "
                "share p(c) of the training set (`class_frequencies`). To sample like the data, draw each image's "
                "id from those shares, `labels = torch.multinomial(torch.tensor(p), 4, replacement=True)`, in "
                "this loop:\n\n" + class_loop(sample_shape, scheduler))
    if kind == "unet+scheduler":
        return (f"A class-conditional `UNet2DModel` ({num_classes} classes, ids 0..{num_classes - 1}"
                f"{f'; id {num_classes} is the null class of classifier-free guidance' if num_classes else ''}) "
                f"and its scheduler; `DDPMPipeline` takes no labels, so sample it with this loop:\n\n"
                + class_loop(sample_shape, scheduler) + "\n\nor with Diffusion Forge: "
                "`dforge generate --model REPO --class 3 --guidance-scale 3 --out threes.png`.")
    if kind == "StableDiffusionPipeline":
        return ("```python\nfrom diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_pretrained"
                "(\"REPO\")\nimage = pipe(\"a prompt\", num_inference_steps=25, guidance_scale=3).images[0]\n```")
    cls = "LDMPipeline" if kind == "LDMPipeline" else "DDPMPipeline"
    return (f"```python\nfrom diffusers import {cls}\npipe = {cls}.from_pretrained(\"REPO\")\n"
            f"images = pipe(batch_size=4, num_inference_steps=1000).images\n```\n\nor with Diffusion Forge's samplers: "
            f"`dforge generate --model REPO --sampler dpmpp_2m --steps 25 --out samples.png`.")


def _metrics(records: list[dict]) -> str:
    last: dict = {}
    for r in records:
        last.update({k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not last:
        return "No metrics were logged."
    rows = ["| metric | last value |", "|---|---|"]
    rows += [f"| {k} | {v:.5g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(last.items())]
    return "\n".join(rows)


def model_card(kind: str, config: dict, info: dict, metrics: list[dict], license: str = "apache-2.0") -> str:
    """README.md text. ``config``: the run's nested config ({} for a pipeline); ``info``: name, step,
    sample_shape, num_classes, schedule (dict), prediction, scheduler (class name), ema (bool), ema_decay,
    samples (file name of the grid, or None)."""
    data = config.get("data", {})
    source = str(data.get("source") or "")
    datasets = [source.removeprefix("hf:")] if source and not source.startswith(("/", ".", "~")) else None
    num_classes = int(info.get("num_classes") or 0)
    weights = (f"the **EMA** weights (exponential moving average, decay {info.get('ema_decay')})" if info.get("ema")
               else "the trained weights (no EMA average)")
    recipe = {k: config.get(k) for k in ("data", "diffusion", "model", "conditioning", "optim", "ema") if k in config}
    parts = [front_matter(kind, license, datasets, kind == "unet+scheduler"),
             f"# {info.get('name', 'diffusion model')}", "",
             f"A diffusion model trained with [Diffusion Forge](https://github.com/) and exported as a diffusers "
             f"`{'UNet2DModel + scheduler' if kind == 'unet+scheduler' else kind}` folder. It holds {weights}, "
             f"step {info.get('step')}.", "",
             f"- samples: shape {list(info.get('sample_shape') or [])}",
             f"- noise schedule: `{json.dumps(info.get('schedule'))}`",
             f"- prediction type: `{info.get('prediction')}`; scheduler: `{info.get('scheduler')}`",
             f"- training steps: {info.get('step')}", ""]
    if info.get("samples"):
        parts += ["## Samples", "", f"![samples]({info['samples']})", "",
                  f"{info.get('samples_note', '')}", ""]
    parts += ["## Usage", "", _usage(kind, info.get("sample_shape") or (3, 32, 32), num_classes,
                                     info.get("scheduler", "DDPMScheduler"), bool(info.get("clusters"))), "",
              "## Metrics", "", _metrics(metrics), "",
              "## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(parts)
