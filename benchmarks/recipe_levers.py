"""Recipe levers at a fixed number of steps: which training change makes a better MNIST model (issue 13).

    python benchmarks/recipe_levers.py --steps 2000 --out outputs/levers \\
        --variant base: \\
        --variant plain_v:diffusion.min_snr_gamma=none \\
        --variant edm:diffusion.min_snr_gamma=none,diffusion.noise_levels=log_normal

Each ``--variant NAME:KEY=VALUE,...`` is the default recipe with those ``--set`` keys, trained from scratch for
``--steps`` steps (same seed, so the same batches and noise where the draw is the same) into ``OUT/NAME`` and then
scored on 1,000 samples (seeds 0-999) of the run's own default sampler at each ``--budgets`` NFE. A run folder
already trained to the step count, and a variant already in OUT/results.json, are reused: a screen can be
stopped and run again. Training runs one at a time; its speed is printed but not compared (the levers here
change quality per step, not the step's cost).

Three instruments, so that no lever is judged by the instrument that chose it:
- FD-Digits@1k (the project's digit classifier) against the MNIST test set, recall, the digit shares;
- FD-EffNet@1k (EfficientNet-Lite0 features at 128 px) against 5,000 MNIST test images, the same draw as
  ``samplers_trained.py --effnet``;
- the background haze: the share of sample pixels at 1..30 of 255 (MNIST test digits: 1.7%), and the share of
  the noise D keeps in the background: for test digits x_0, x = x_0 + sigma eps and x0_hat = D(x, sigma),
  kept(sigma) = sum_bg (x0_hat - x_0) sigma eps / sum_bg (sigma eps)^2 over background pixels (x_0 = -1); a
  perfect denoiser keeps 0 there, the identity keeps 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_tables import fmt_row  # noqa: E402
from samplers_trained import DigitScorer  # noqa: E402

from diffusion_forge.data import load_mnist, to_uint8  # noqa: E402
from diffusion_forge.io.checkpoint import load_model_from_run  # noqa: E402
from diffusion_forge.io.files import write_json  # noqa: E402
from diffusion_forge.sampling.generate import generate  # noqa: E402
from diffusion_forge.training import Trainer, merge_config  # noqa: E402
from diffusion_forge.training.layers import parse_set_flags  # noqa: E402

PROBE_SIGMAS = (0.02, 0.05, 0.1)
HAZE_LEVELS = (1, 30)        # grey levels (of 255) counted as haze on MNIST's black background


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: write NAME:KEY=VALUE,... (NAME: for the recipe as it is)")
    return name, parse_set_flags([item for item in rest.split(",") if item])


def train_variant(run: Path, flags: dict, steps: int, seed: int) -> dict:
    """Train (or finish) the run; returns its steps/s over the whole run."""
    cfg = merge_config(flags={"data.source": "mnist", "run.seed": seed, "run.sample_every": 0,
                              "optim.steps": steps, **flags})
    t0 = time.perf_counter()
    summary = Trainer(cfg, run, progress=True).fit()
    seconds = time.perf_counter() - t0
    return {"steps_per_s": (summary["step"] - summary["start_step"]) / max(seconds, 1e-9), "train_s": seconds}


def kept_noise(D, images: np.ndarray, seed: int = 0) -> dict:
    """The share of the noise that one call of D leaves in the background of test digits, per sigma."""
    x0 = torch.as_tensor(images).float()
    x0 = (x0[:, None] if x0.ndim == 3 else x0.permute(0, 3, 1, 2)) / 127.5 - 1   # uint8 N H W (C) -> [-1, 1]
    background = x0 <= -1 + 1e-6
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for sigma in PROBE_SIGMAS:
            n = sigma * torch.randn(x0.shape, generator=g)
            x0_hat = D(x0 + n, sigma).float()
            err = (x0_hat - x0)[background]
            out[f"kept_{sigma:g}"] = float((err * n[background]).sum() / n[background].pow(2).sum())
    return out


def haze(u8: np.ndarray) -> float:
    lo, hi = HAZE_LEVELS
    return float(((u8 >= lo) & (u8 <= hi)).mean())


def score_variant(run: Path, scorer: DigitScorer, budgets, n: int, probe_images: np.ndarray) -> dict:
    D = load_model_from_run(run).eval()
    out = {"step": D.step, **kept_noise(D, probe_images)}
    for b in budgets:
        with torch.no_grad():
            x = generate(D, n, seed=0, steps=b, batch_size=250, progress=True, precision="auto")
        u8 = to_uint8(x)
        out[str(b)] = {**scorer.score(u8), "haze": haze(u8)}
        print(f"  {run.name} {b} NFE: {fmt_row(out[str(b)])}; haze {out[str(b)]['haze']:.1%}", flush=True)
    return out


def table(results: dict, budgets, floor: dict, test_haze: float) -> str:
    head = ("| variant | settings | steps/s | " + " | ".join(
        f"{b} NFE: FD-Digits / FD-EffNet / recall / shares / haze" for b in budgets)
        + " | kept noise at sigma " + " / ".join(f"{s:g}" for s in PROBE_SIGMAS) + " |")
    lines = [head, "|---|---|---:|" + "---|" * len(budgets) + "---|"]
    for name, r in results.items():
        cells = []
        for b in budgets:
            c = r[str(b)]
            cells.append(f"{c['fd']:.2f} / {c['fd_effnet']:.1f} / {c['recall']:.3f} / "
                         f"{c['class_min']:.1%}-{c['class_max']:.1%} / {c['haze']:.1%}")
        kept = " / ".join(f"{r[f'kept_{s:g}']:.2f}" for s in PROBE_SIGMAS)
        settings = ", ".join(f"{k}={v}" for k, v in r["flags"].items()) or "the recipe as it is"
        lines.append(f"| {name} | {settings} | {r['steps_per_s']:.2f} | " + " | ".join(cells) + f" | {kept} |")
    lines.append(f"\nFloor (1,000 training images): FD-Digits {floor['fd']:.2f}, FD-EffNet {floor['fd_effnet']:.1f}, "
                 f"recall {floor['recall']:.3f}; MNIST test digits' haze {test_haze:.1%}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help="NAME:KEY=VALUE,... (repeat; NAME: as it is)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps of every variant")
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 20], help="NFE of the default sampler")
    p.add_argument("--n", type=int, default=1000, help="samples per score")
    p.add_argument("--seed", type=int, default=0, help="the runs' seed")
    p.add_argument("--out", default="outputs/bench-recipe-levers")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved and saved.get("steps") != args.steps:
        raise SystemExit(f"{path} holds a screen at {saved.get('steps')} steps; use another --out")
    results = saved.get("variants", {})
    scorer = DigitScorer(args.n, effnet=True)
    test = load_mnist("test")[0]
    probe = test[np.random.default_rng(1).choice(len(test), 500, replace=False)]
    floor = saved.get("floor") or {**scorer.floor(), "haze": haze(test)}
    print(f"threads {torch.get_num_threads()}; floor {fmt_row(floor)}; test haze {floor['haze']:.1%}", flush=True)
    for name, flags in variants:
        if name in results and results[name]["flags"] == flags:
            continue
        print(f"\n{name}: {flags or 'the recipe as it is'}", flush=True)
        speed = train_variant(out / name, flags, args.steps, args.seed)
        results[name] = {"flags": flags, **speed, **score_variant(out / name, scorer, args.budgets, args.n, probe)}
        write_json(path, {"steps": args.steps, "floor": floor, "variants": results})
    print(f"\n{args.steps} steps each, {args.n} samples, the run's default sampler\n")
    print(table({name: results[name] for name, _ in variants}, args.budgets, floor, floor["haze"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
