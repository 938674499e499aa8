"""`dforge train`: train a diffusion model into a run folder, or resume it."""
from __future__ import annotations

import sys


EXAMPLES = """examples:
  dforge train --data mnist --out runs/mnist                    the default recipe (minutes on 2 cores)
  dforge train --data photos/ --out runs/photos --set data.image_size=32 --set model.preset=tiny
                                                                a CPU-sized image-folder run (GPU: preset=base)
  dforge train --data mnist --conditioning class --out runs/mnist-cond     class-conditional (labels dropped to
                                                                a null class 10% of the time: one model for
                                                                conditional and unconditional sampling, and CFG)
  dforge train --data photos/ --conditioning cluster --out runs/photos-clu  no labels: k-means clusters of the
                                                                images as classes, sampled like the data
  dforge train --data mnist --conditioning text --out runs/mnist-text     text prompts: captions "a handwritten
                                                                seven", ...; then dforge sample --prompt "..."
  dforge train --data mnist --out runs/sd --set diffusion.schedule=scaled_linear \\
      --set diffusion.beta_start=0.00085 --set diffusion.beta_end=0.012 --set diffusion.prediction=epsilon
  dforge train --data mnist --minutes 10 --out runs/mnist10     as many steps as fit in 10 minutes on this
                                                                machine (the learning rate ends on time)
  dforge train --data mnist --minutes 10 --conditioning cluster --out runs/mnist10c
                                                                the best 10-minute model here (README, "Time
                                                                to quality"): clusters, no labels
  dforge train --out runs/mnist                                 resume (also after a crash or Ctrl-C)
  dforge train --out runs/mnist --set optim.steps=6000 --allow-changes
  dforge train --data mnist --overfit-batch                     does the pipeline learn at all?
  torchrun --nproc_per_node 2 -m diffusion_forge train --data mnist --out runs/mnist   2 CPU processes (gloo)
  accelerate launch --num_processes 4 -m diffusion_forge train --data mnist --out runs/mnist   4 GPUs

config keys (--set SECTION.KEY=VALUE, or a YAML/JSON file of sections; defaults < file < --set;
the flat names of the first release still work; see docs/training.md):
"""


def register(sub) -> None:
    from . import HelpFormatter

    p = sub.add_parser("train", help="train a diffusion model (or resume a run folder)",
                       description="Train a diffusion model on your images or a bundled data set. The run folder "
                                   "gets config.json, checkpoints/, samples/, metrics.jsonl and loss.png; running "
                                   "the command again on it resumes from the newest checkpoint.",
                       formatter_class=HelpFormatter, epilog=epilog())
    p.add_argument("--data", help="data set of a new run: a bundled name (mnist, digits, emoji, moons, ...), a "
                                  "folder of images, or hf:NAME (same as --set data.source=...)")
    p.add_argument("--out", help="the run folder (created, or resumed when it holds a run)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of config keys (sections or dotted keys)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one config key, e.g. optim.lr=1e-3 (repeatable); wins over --config")
    p.add_argument("--conditioning", metavar="KIND", default=None,
                   help="(same as --set conditioning.kind=...) none, class (condition on the data's class "
                        "labels), cluster (on the ids of conditioning.clusters k-means clusters of the images: no "
                        "labels needed; `dforge sample` then draws clusters from their shares, like the data) or "
                        "text (on its captions, through a frozen text encoder: conditioning.text_encoder); "
                        "a label is replaced by the null class (a caption by the empty prompt) with probability "
                        "conditioning.dropout (default 0.1), which classifier-free guidance needs")
    p.add_argument("--latent", metavar="VAE", default=None,
                   help="latent diffusion: train in the latent space of this VAE (a `dforge train-vae` folder, a "
                        "diffusers AutoencoderKL folder or hub name; same as --set data.latent=...); the run keeps "
                        "a copy in RUN/vae/ and its samples are decoded images")
    p.add_argument("--device", default=None,
                   help="auto, cpu, cuda, cuda:N or mps (same as --set run.device=...; default: run.device)")
    p.add_argument("--init-from", metavar="PATH_OR_HUB_ID", default=None,
                   help="fine-tune a pretrained diffusers UNet2DModel (a UNet folder, a DDPMPipeline folder or hub id; "
                        "same as --set model.init_from=...): its architecture and weights, and its schedule and "
                        "prediction type unless set; a StableDiffusionPipeline folder trains a latent text run with "
                        "its VAE and text encoder on captioned data (--conditioning text)")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume an existing run even though some settings differ from those it started with")
    p.add_argument("--overfit-batch", action="store_true",
                   help="sanity check: train on one fixed batch and print whether the loss falls below "
                        "0.1 x its initial value (no run folder is written)")
    p.add_argument("--overfit-steps", type=int, default=300, help="steps of the --overfit-batch check")
    p.add_argument("--minutes", type=float, default=None,
                   help="fit the whole run into this many minutes from the command's start (same as --set "
                        "optim.minutes=...): optim.steps is planned, and re-planned every 20 steps, from the "
                        "measured speed, so the cosine learning rate reaches its end on time on a fast machine or "
                        "a slow one; the plan is written to config.json and metrics.jsonl")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="pause after this much training time, with a checkpoint (run again to go on); the run "
                        "keeps its optim.steps (--minutes fits the steps to the time instead)")
    p.add_argument("--print-config", action="store_true", help="print the merged config (nested JSON) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.set_defaults(func=run)


def epilog() -> str:
    """Every config key with its default and help, from the field metadata of training/config.py."""
    from ..training.layers import help_rows

    rows = help_rows()
    key_w = max(len(k) for k, _, _ in rows)
    default_w = min(16, max(len(d) for _, d, _ in rows))
    lines, section = [], None
    for key, default, help_text in rows:
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append(f"  [{section}]")
        lines.append(f"  {key:<{key_w}}  {default:<{default_w}}  {help_text}")
    return EXAMPLES + "\n".join(lines)


def _flags(args) -> dict:
    from ..training import parse_set_flags

    flags = parse_set_flags(args.overrides)
    if args.data is not None:
        flags["data.source"] = args.data
    if args.conditioning is not None:
        flags["conditioning.kind"] = args.conditioning
    if args.latent is not None:
        flags["data.latent"] = args.latent
    if args.minutes is not None:
        flags["optim.minutes"] = args.minutes
    if args.device is not None:
        flags["run.device"] = args.device
    if args.init_from is not None:
        flags["model.init_from"] = args.init_from
    return flags


def _check_out(out: str):
    """--out must be a folder (or not exist yet), and writable."""
    from pathlib import Path

    from ..io.files import OutputError

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {out} is a file, not a run folder; choose a folder name (e.g. runs/NAME)")
    return path


def run(args) -> int:
    import json
    import time

    started = time.perf_counter()    # optim.minutes counts from here

    from ..training import TrainingDiverged, merge_config, overfit_batch, run_config, train
    from . import UserError

    flags = _flags(args)
    if args.overfit_batch:
        cfg = merge_config(None, args.config, flags)
        result = overfit_batch(cfg, steps=args.overfit_steps, progress=not args.no_progress)
        print(result["verdict"])
        return 0 if result["passed"] else 1
    if args.print_config and not args.out:  # the config a new run would get
        print(json.dumps(merge_config(None, args.config, flags).to_dict(), indent=2))
        return 0
    if not args.out:
        raise UserError("--out RUN_FOLDER is required (it is created, or resumed when it holds a run)")
    out = _check_out(args.out)
    cfg, changes = run_config(out, args.config, flags, allow_changes=args.allow_changes,
                              require_data=not args.print_config)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from ..device import resolve_device
    from ..io.files import check_writable_dir, missing_ancestor, remove_empty_new_dirs

    resolve_device(cfg.run.device)  # --device cuda on a CPU-only torch: one line, before any work
    new_dirs = missing_ancestor(out)
    check_writable_dir(out)
    if changes:
        print("resuming with changed settings: " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    try:
        summary = train(cfg, out, progress=not args.no_progress, started=started,
                        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    except TrainingDiverged as e:
        print(f"dforge train: error: {e}", file=sys.stderr)
        return 1
    except BaseException:   # bad input found while building the run (or Ctrl-C then): leave no empty run folder
        remove_empty_new_dirs(out, new_dirs)
        raise
    if summary["interrupted"]:
        return 130
    if summary["step"] > summary["start_step"]:
        print(f"trained {out} to step {summary['step']} in {summary['seconds']:.0f} s; samples: "
              f"{summary.get('samples', '-')}; loss curve: {out / 'loss.png'}")
    else:
        print(f"{out} is already trained to step {summary['step']} "
              "(raise it with --set optim.steps=N --allow-changes)")
    return 0
