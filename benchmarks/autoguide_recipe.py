"""Autoguidance on a finished unconditional run: does guiding it by a weaker copy of itself lower FD-Digits?

    python benchmarks/autoguide_recipe.py --run outputs/bench-ttq-s19-uncond3/ours-10min --floor-seed 3 \\
        --guides snapshot:1.2 snapshot:1.5 snapshot:2 2500:2

Autoguidance (Karras et al. 2024): x0 = x0_weak + w (x0_main - x0_weak), two network calls a step. Each
``--guides GUIDE:W`` scores 1,000 samples (seeds S to S + 999, ``--seed S``) of the run's own default sampler at
``--steps`` steps, guided with scale W by GUIDE: ``snapshot`` (the run's autoguidance snapshot,
checkpoints/guide-*) or a step whose checkpoint the run kept. The unguided run (w = 1) is the first row.
Scores: time_to_quality's Scorer (FD-Digits, precision, recall, digit shares against the MNIST test set; floor
from 1,000 training images drawn by ``--floor-seed``, the seed of the time-to-quality run that made the network).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_quality import Scorer, autoguided, draw  # noqa: E402

from diffusion_forge.denoise.guidance import AutoGuidance  # noqa: E402
from diffusion_forge.io.checkpoint import CheckpointError, load_model_from_run  # noqa: E402
from diffusion_forge.sampling.registry import resolve_sampler  # noqa: E402


def parse_guide(text: str) -> tuple[str, float]:
    guide, sep, scale = text.rpartition(":")
    try:
        w = float(scale)
    except ValueError:
        w = None
    if not sep or not (guide == "snapshot" or guide.isdigit()) or w is None or not w > 0:
        raise SystemExit(f"--guides {text!r}: write snapshot:W or STEP:W with W > 0 (e.g. snapshot:1.3, 2500:2)")
    return guide, w


def guided(D, run: str, guide: str, w: float):
    """D guided at scale w by the run's snapshot (as time_to_quality --autoguidance) or by the checkpoint of a step."""
    if guide == "snapshot":
        return autoguided(D, Path(run), w)
    return AutoGuidance(D, load_model_from_run(run, step=int(guide)), w)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="an unconditional MNIST run folder")
    p.add_argument("--guides", nargs="+", default=["snapshot:1.3"],
                   help="GUIDE:W, GUIDE = snapshot or a checkpoint's step")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (NFE of the unguided run)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="sample i draws its noise from seed + i")
    p.add_argument("--floor-seed", type=int, default=0)
    args = p.parse_args(argv)
    guides = [parse_guide(g) for g in args.guides]
    try:                                      # every guide loads before the scorer's minute of set-up
        D = load_model_from_run(args.run)
        models = [("none", 1.0, D)] + [(g, w, guided(D, args.run, g, w)) for g, w in guides]
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    score = Scorer(args.n, args.floor_seed)
    name, steps, options = resolve_sampler(None, args.steps, {}, samples="unconditional")
    print(f"floor: {score.floor}\n{args.run} at step {D.step}; {name} {steps} steps {options}; seeds {args.seed}+",
          flush=True)
    print("| guide | w | FD-Digits | precision | recall | digit shares | s |\n|---|---:|---:|---:|---:|---|---:|")
    for guide, w, model in models:
        t0 = time.perf_counter()
        r = score(draw(model, args.n, name, steps, options, seed=args.seed))
        print(f"| {guide} | {w:g} | {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['min_share']:.1%}-{r['max_share']:.1%} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
