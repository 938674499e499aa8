"""`dforge demo`: train the default recipe on bundled MNIST and write its pictures under one folder.

The output folder is itself the run folder of the training (config.json, checkpoints/, samples/,
metrics.jsonl, loss.png), plus samples.png, schedules.png and forward.png. Running the demo again
resumes or reuses the finished run.
"""
from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("demo", help="train the default recipe on bundled MNIST and write its pictures",
                       description="Plot the noise schedules and a digit turning into noise, train the default "
                                   "recipe on MNIST (about 10 minutes on 2 CPU cores), sample it, and score the "
                                   "samples with the digit classifier.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="folder for the demo's files (also the run folder)")
    p.add_argument("--n", type=int, default=1000, help="samples drawn and scored by the digit classifier")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override a key of the default recipe (see `dforge train --help`), e.g. optim.steps=500")
    p.add_argument("--no-score", action="store_true", help="skip the digit-classifier score")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..data import load_mnist, to_model_range, to_uint8
    from ..io.checkpoint import load_model_from_run
    from ..sampling.generate import generate
    from ..sampling.registry import resolve_sampler
    from ..training import TrainingDiverged, parse_set_flags, run_config, train
    from ..training.config import SAMPLES_OF_KIND
    from ..viz import plot_forward_strip, plot_schedules, save_image_grid

    out = Path(args.out)
    flags = {"data.source": "mnist", **parse_set_flags(args.overrides)}
    cfg, _ = run_config(out, None, flags, allow_changes=True)   # bad keys fail before any picture is drawn
    images, _ = load_mnist("test")
    plot_schedules(out / "schedules.png")
    plot_forward_strip(out / "forward.png", to_model_range(images[:1])[0])
    print(f"wrote {out / 'schedules.png'} and {out / 'forward.png'}")

    try:
        summary = train(cfg, out, progress=not args.no_progress)
    except TrainingDiverged as e:
        print(f"dforge demo: error: {e}", file=sys.stderr)
        return 1
    if summary["interrupted"]:
        return 130

    denoiser = load_model_from_run(out)     # EMA weights, with the run's schedule and prediction
    clusters = cfg.conditioning.kind == "cluster"
    sampler, steps, options = resolve_sampler(cfg.sample.sampler, cfg.sample.steps, cfg.sample.options,
                                              samples=SAMPLES_OF_KIND[cfg.conditioning.kind])
    cond = None
    if clusters:              # a cluster run: clusters drawn from p(c), like the data (as `dforge sample`)
        from ..sampling.generate import data_class_labels

        cond = {"class_labels": data_class_labels(denoiser.class_frequencies, args.n, seed=0)}
    elif denoiser.num_classes:  # a class-conditional recipe: labels 0, 1, ..., K-1, 0, 1, ...
        import torch

        cond = {"class_labels": torch.arange(args.n) % denoiser.num_classes}
    # a conditional run: classifier-free guidance at the run's recommended scale (None: no guidance)
    guidance = {} if denoiser.guidance_scale is None else {"guidance_scale": denoiser.guidance_scale}
    x = generate(denoiser, args.n, seed=0, sampler=sampler, steps=steps, sampler_options=options, cond=cond,
                 progress=not args.no_progress, **guidance)
    samples = to_uint8(x)
    cfg_note = f", CFG w = {denoiser.guidance_scale:g}" if guidance else ""
    rows = None if cond is None or clusters else [f"class {int(c)}" for c in cond["class_labels"][:100]]   # a row per class
    save_image_grid(samples[:100], out / "samples.png", nrow=10, row_labels=rows,
                    title=f"{out.name}: step {denoiser.step}, {sampler}, {steps} steps{cfg_note}")
    print(f"wrote {out / 'samples.png'} ({min(args.n, 100)} of {args.n} samples, step {denoiser.step}, EMA "
          f"weights, {sampler} {options or ''} with {steps} steps) and the loss curve {out / 'loss.png'}")
    if not args.no_score:
        try:
            from ..evaluate import digit_confidence_score
        except ImportError:
            return 0
        score = digit_confidence_score(samples)
        print(f"digit classifier: {score:.1%} of {args.n} samples are labelled with confidence >= 0.9 "
              "(the default 2,000-step recipe: 77-79% with the default sampler at 20 steps; README)")
    return 0

