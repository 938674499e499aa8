"""`dforge export`: write a trained run as a diffusers folder (pipeline, scheduler, model card)."""
from __future__ import annotations

from . import HelpFormatter, add_force

EXAMPLES = """examples:
  dforge export runs/mnist --out exported/mnist-ddpm              a DDPMPipeline folder
  dforge export runs/mnist-cond --out exported/mnist-cond         UNet2DModel + scheduler (+ a sampling loop in the card)
  dforge export runs/mnist --out exported/mnist-ddpm --force      replace an earlier export
  dforge push exported/mnist-ddpm --repo you/mnist-ddpm           then share it on the Hugging Face hub
Unconditional runs become a DDPMPipeline, class-conditional runs a UNet2DModel with num_class_embeds plus its
scheduler, latent text runs a StableDiffusionPipeline. The weights are the EMA average unless --no-ema. The
scheduler is a DDPMScheduler of the run's noise schedule and prediction type (clip_sample off, trailing spacing).
"""


def register(sub) -> None:
    p = sub.add_parser("export", help="export a trained run as a diffusers folder with a model card",
                       description="Write the newest checkpoint of a run folder as a folder that diffusers loads as it "
                                   "is (model_index.json, unet/, scheduler/, ...), with a model card README.md (YAML "
                                   "front matter for the hub, the recipe, steps, metrics) and a sample grid. Written "
                                   "into OUT.tmp and renamed when complete.",
                       formatter_class=HelpFormatter, epilog=EXAMPLES)
    p.add_argument("run", help="run folder written by `dforge train`")
    p.add_argument("--out", required=True, help="the folder to write (refused when it exists, unless --force)")
    add_force(p)
    p.add_argument("--no-ema", action="store_true", help="export the trained weights instead of their EMA average")
    p.add_argument("--license", default="apache-2.0", help="the license named in the model card")
    p.add_argument("--prompt", action="append", default=None, dest="prompts",
                   help="prompt of the card's sample grid (text runs; repeatable)")
    p.add_argument("--no-samples", action="store_true", help="no sample grid in the card (faster)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from ..interop.export import export_run

    start = time.time()
    out = export_run(args.run, args.out, force=args.force, use_ema=not args.no_ema, license=args.license,
                     samples=not args.no_samples, prompts=args.prompts)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    print(f"exported {args.run} to {out} ({len(files)} files: {', '.join(f for f in files if '/' not in f)}, "
          f"{', '.join(sorted({f.split('/')[0] + '/' for f in files if '/' in f}))}) in {time.time() - start:.1f} s")
    return 0
