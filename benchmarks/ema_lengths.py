"""EMA length at a fixed training budget: which average of one run's weights samples best (issue 13).

    python benchmarks/ema_lengths.py --steps 3500 --out outputs/bench-ema-lengths

Trains the default MNIST recipe once for ``--steps`` steps into OUT/run and keeps, beside the recipe's own EMA
(decay 0.999 with the (1 + k) / (10 + k) warm-up, nearly a power-function EMA of sigma_rel 0.09 for the first
9,000 steps), one power-function EMA per ``--sigma-rel`` (Karras et al. 2024: d_k = (1 - 1/k)^(gamma + 1), an
average over a profile proportional to tau^gamma of relative width sigma_rel; training/ema.py). They cost one
fused lerp each per step. At the end each average is saved as OUT/ema/sigma_rel-S.safetensors, and every average
and the raw weights are scored on 1,000 samples of the run's default sampler at each ``--budgets`` NFE, on two
blocks of seeds (0-999 and 1000-1999) so that a difference can be told from a new draw of seeds:
- FD-Digits@1k (the project's digit classifier) against the MNIST test set, recall and the digit shares;
- FD-EffNet@1k (EfficientNet-Lite0 features), a second instrument that chose nothing here.

A run already trained to ``--steps`` and averages already saved are reused (scoring only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_tables import fmt_row  # noqa: E402
from samplers_trained import DigitScorer  # noqa: E402

from diffusion_forge.data import to_uint8  # noqa: E402
from diffusion_forge.io.checkpoint import load_model_from_run  # noqa: E402
from diffusion_forge.io.files import atomic_write, write_json  # noqa: E402
from diffusion_forge.sampling.generate import generate  # noqa: E402
from diffusion_forge.training import Trainer, merge_config  # noqa: E402
from diffusion_forge.training.ema import EMA, gamma_for_sigma_rel  # noqa: E402

SIGMA_RELS = (0.03, 0.05, 0.13, 0.2, 0.28)


def train(run: Path, ema_dir: Path, steps: int, sigma_rels, seed: int) -> float:
    """Train with the extra averages riding on the recipe's EMA update; save them. Returns the training seconds."""
    cfg = merge_config(flags={"data.source": "mnist", "run.seed": seed, "run.sample_every": 0, "optim.steps": steps})
    if (run / "checkpoints").exists():
        raise SystemExit(f"{run} holds a run without all of its averages; remove {run} (or use another --out)")
    trainer = Trainer(cfg, run, progress=True)
    extras = {s: EMA(trainer.unwrapped, sigma_rel=s) for s in sigma_rels}
    own_update = trainer.ema.update

    def update(model):                      # the recipe's EMA, then each power-function EMA, after every step
        d = own_update(model)
        for e in extras.values():
            e.update(model)
        return d

    trainer.ema.update = update
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    ema_dir.mkdir(parents=True, exist_ok=True)
    for s, e in extras.items():
        atomic_write(ema_dir / f"sigma_rel-{s:g}.safetensors", lambda tmp, e=e: save_file(e.state_dict(), tmp))
    return seconds


def averages(run: Path, ema_dir: Path, sigma_rels):
    """(name, Denoiser) for the recipe's EMA, the raw weights and each saved power-function EMA."""
    yield "recipe EMA (0.999, warm-up)", load_model_from_run(run).eval()
    yield "raw weights", load_model_from_run(run, use_ema=False).eval()
    for s in sigma_rels:
        D = load_model_from_run(run).eval()
        D.model.load_state_dict(load_file(ema_dir / f"sigma_rel-{s:g}.safetensors"))
        yield f"sigma_rel {s:g} (gamma {gamma_for_sigma_rel(s):.1f})", D


def cell(c) -> str:
    """One table cell: FD-Digits / FD-EffNet / recall / digit shares (a dash where the block was not scored)."""
    if c is None:
        return "-"
    return f"{c['fd']:.2f} / {c['fd_effnet']:.1f} / {c['recall']:.3f} / {c['class_min']:.1%}-{c['class_max']:.1%}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=3500, help="optimiser steps (3,500: about the 10-minute run)")
    p.add_argument("--sigma-rel", type=float, nargs="+", default=list(SIGMA_RELS), help="power-function EMA widths")
    p.add_argument("--budgets", type=int, nargs="+", default=[20], help="NFE of the default sampler")
    p.add_argument("--n", type=int, default=1000, help="samples per block of seeds")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 1000],
                   help="first seed of each block of --n seeds (a later call with new blocks adds columns)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed")
    p.add_argument("--out", default="outputs/bench-ema-lengths")
    args = p.parse_args(argv)
    for s in args.sigma_rel:
        gamma_for_sigma_rel(s)                                  # a clear error for a width out of range
    out = Path(args.out)
    run, ema_dir = out / "run", out / "ema"
    missing = [s for s in args.sigma_rel if not (ema_dir / f"sigma_rel-{s:g}.safetensors").exists()]
    train_s = train(run, ema_dir, args.steps, args.sigma_rel, args.seed) if missing else None
    scorer = DigitScorer(args.n, effnet=True)
    floor = scorer.floor()
    print(f"floor (1,000 training images): {fmt_row(floor)}", flush=True)
    old = out / "results.json"
    earlier = json.loads(old.read_text()) if old.exists() else {}
    rows = earlier.get("rows", {})                               # earlier blocks stay in the table
    train_s = train_s if train_s is not None else earlier.get("train_s")
    for name, D in averages(run, ema_dir, args.sigma_rel):
        rows.setdefault(name, {})
        for b in args.budgets:
            for block in args.blocks:
                with torch.no_grad():
                    x = generate(D, args.n, seed=block, steps=b, batch_size=250, progress=True, precision="auto")
                r = scorer.score(to_uint8(x))
                rows[name][f"{b} NFE, seeds {block}-{block + args.n - 1}"] = r
                print(f"  {name:<32} {b} NFE seeds {block}+: {fmt_row(r)}", flush=True)
        write_json(out / "results.json", {"steps": args.steps, "train_s": train_s, "floor": floor, "rows": rows})
    cols = sorted({c for r in rows.values() for c in r}, key=lambda c: (int(c.split()[0]), int(c.split()[-1].split("-")[0])))
    print(f"\n{args.steps} steps, {args.n} samples per block, the default sampler; each cell FD-Digits / "
          f"FD-EffNet / recall / digit shares\n")
    print("| average | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(cell(r.get(c)) for c in cols) + " |")
    print(f"\nFloor: FD-Digits {floor['fd']:.2f}, FD-EffNet {floor['fd_effnet']:.1f}, recall {floor['recall']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
