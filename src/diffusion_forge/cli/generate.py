"""`dforge generate`: images from a pretrained diffusers pipeline (folder or hub id) with our samplers or its
own schedulers."""
from __future__ import annotations

from . import HelpFormatter, UserError, add_force

EXAMPLES = """examples:
  dforge generate --model google/ddpm-cifar10-32 --sampler dpmpp_2m --steps 25 --n 16 --out cifar.png
  dforge generate --model runwayml/stable-diffusion-v1-5 --prompt "a watercolour fox" --negative-prompt "blurry" \\
      --guidance-scale 7.5 --steps 25 --seed 0 --n 4 --out fox.png
  dforge generate --model exported/ --scheduler DPMSolverMultistepScheduler --steps 20 --out theirs.png
  dforge generate --model sd/ --prompt "a cat" --compare-samplers dpmpp_2m,euler,ddim --out compare.png
Image i uses the seed SEED + i in both paths (our samplers and the diffusers scheduler's own loop), so for the
same sigmas the two give the same images. Classifier-free guidance runs where --guidance-scale > 1, as in
diffusers. An .npz (key `images`: uint8 N x H x W x C, plus `seeds`, `samplers`, `prompt`) is written beside
the picture.
"""


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a pretrained diffusers pipeline (folder or hub id)",
                       description="Load a diffusers pipeline (DDPMPipeline, DDIMPipeline, StableDiffusionPipeline, "
                                   "LDMPipeline, DiTPipeline, or an `dforge export` folder) as a Denoiser and sample "
                                   "it with our samplers, or with a diffusers scheduler through its own loop. "
                                   "Never runs custom code; safetensors weights only.",
                       formatter_class=HelpFormatter, epilog=EXAMPLES)
    p.add_argument("--model", required=True, help="a pipeline folder (save_pretrained / dforge export) or a hub id "
                                                  "user/name (downloaded with diffusers; offline: the cache only)")
    p.add_argument("--prompt", default=None, help="the text prompt (text-to-image pipelines)")
    p.add_argument("--negative-prompt", default=None,
                   help="replaces the empty prompt as the unconditional branch of classifier-free guidance")
    p.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class id (class-conditional pipelines: DiT, exported class-conditional runs)")
    p.add_argument("--sampler", default=None, help="one of our samplers (dpmpp_2m, euler, ddim, unipc, ...; "
                                                   "default dpmpp_2m unless --scheduler is given)")
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   help="a diffusers scheduler class (e.g. DPMSolverMultistepScheduler, EulerDiscreteScheduler), "
                        "configured from the pipeline's scheduler config and run through the pipeline's own loop")
    p.add_argument("--scheduler-options", metavar="KEY=VALUE,...", default=None,
                   help="overrides of the scheduler config, e.g. timestep_spacing=trailing")
    p.add_argument("--sampler-options", metavar="KEY=VALUE,...", default=None, help="options of our sampler, e.g. eta=0.5")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale w (> 1 guides; default: the pipeline's, 7.5 for Stable "
                        "Diffusion, 4 for DiT, none for unconditional pipelines)")
    p.add_argument("--sigmas", default="default", help="our samplers' grid: default, karras or exponential")
    p.add_argument("--spacing", default="trailing", help="our samplers' timestep spacing: trailing, leading or linspace")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--noise", choices=("independent", "brownian"), default="independent",
                   help="our stochastic samplers' fresh noise: independent (a new draw every step, as diffusers) or "
                        "brownian (one Brownian path per seed: nearly the same image at every step count)")
    p.add_argument("--n", type=int, default=4, help="number of images")
    p.add_argument("--compare-samplers", metavar="A,B,...", default=None,
                   help="one grid of the same seeds through several of our samplers, a row each")
    p.add_argument("--out", default="image.png", help="the picture (.png / .jpg); the .npz goes beside it")
    add_force(p)
    p.add_argument("--batch-size", type=int, default=16, help="images per network call")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: auto: a GPU when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _check(args) -> list[str]:
    """The samplers to run (empty: the diffusers scheduler), every flag checked before any work."""
    from .sample import check_grid, check_samplers

    if args.n < 1 or args.steps < 1 or args.batch_size < 1:
        raise UserError("--n, --steps and --batch-size must be >= 1")
    if args.scheduler and (args.sampler or args.compare_samplers):
        raise UserError("pass --scheduler (a diffusers scheduler) or --sampler / --compare-samplers (ours), not both")
    if args.scheduler and args.noise != "independent":
        raise UserError("--noise brownian applies to our samplers; a diffusers scheduler draws its own noise: pass "
                        "--sampler (e.g. euler_ancestral) instead of --scheduler")
    if args.sampler and args.compare_samplers:
        raise UserError("pass --sampler or --compare-samplers, not both")
    names = [s.strip() for s in (args.compare_samplers or "").split(",") if s.strip()]
    if args.compare_samplers is not None and not names:
        raise UserError("--compare-samplers takes sampler names separated by commas, e.g. dpmpp_2m,euler,ddim")
    if not args.scheduler and not names:
        names = [args.sampler or "dpmpp_2m"]
    check_samplers(names, auto=False)
    check_grid(args.sigmas, args.spacing)
    return names


def run(args) -> int:
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from ..io.files import IMAGE_SUFFIXES, check_output
    from .sample import parse_options, write_npz

    samplers = _check(args)
    options = parse_options(args.sampler_options)
    overrides = parse_options(args.scheduler_options, "--scheduler-options")
    out = Path(args.out)
    check_output(out, IMAGE_SUFFIXES, force=args.force)
    npz = check_output(out.with_suffix(".npz"), (".npz",), force=args.force)

    from ..data import to_uint8
    from ..device import resolve_device
    from ..interop.pipeline_sampling import sample_ours, sample_scheduler, scheduler_from_name
    from ..interop.pipelines import load_pipeline
    from ..viz import save_samples

    device = resolve_device(args.device)
    start = time.time()
    D = load_pipeline(args.model, device=device)
    loaded = time.time() - start
    w = args.guidance_scale if args.guidance_scale is not None else D.guidance_scale
    common = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, class_label=args.class_label,
                  guidance_scale=w)
    scheduler = scheduler_from_name(D, args.scheduler, **overrides) if args.scheduler else None
    start = time.time()
    if scheduler is not None:
        images = [sample_scheduler(D, scheduler, args.n, seed=args.seed, steps=args.steps,
                                   progress=not args.no_progress, **common)]
        ran = [args.scheduler]
    else:
        images = [sample_ours(D, args.n, seed=args.seed, sampler=name, steps=args.steps, sigmas=args.sigmas,
                              spacing=args.spacing, sampler_options=options if len(samplers) == 1 else None,
                              batch_size=args.batch_size, progress=not args.no_progress, noise=args.noise,
                              **common)
                  for name in samplers]
        ran = samplers
    seconds = time.time() - start
    x = torch.cat(images)
    labels = [name for name in ran for _ in range(args.n)]
    guided = w is not None and w > 1 and D.null_cond is not None
    what = f"{', '.join(ran)}, {args.steps} steps" + (f", CFG w = {w:g}" if guided else "")
    title = f"{Path(args.model).name or args.model}: {what}, seeds {args.seed}..{args.seed + args.n - 1}"
    save_samples(x, out, title=title, row_labels=labels if len(ran) > 1 else None)
    seeds = np.tile(np.arange(args.seed, args.seed + args.n, dtype=np.int64), len(ran))
    write_npz(npz, {"images": to_uint8(x), "seeds": seeds, "samplers": np.array(labels),
                    "prompt": np.array(args.prompt or ""), "negative_prompt": np.array(args.negative_prompt or "")})
    print(f"ran {args.model} ({D.pipeline_kind}, loaded in {loaded:.1f} s) on {device}: {what}, guidance "
          f"{f'{w:g}' if guided else 'none'}, {len(x)} images in {seconds:.1f} s; wrote {out} and {npz}")
    return 0
