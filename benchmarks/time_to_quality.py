"""Time to quality: FD-Digits@n against wall-clock minutes, our default recipe against the course recipe.

    python benchmarks/time_to_quality.py                    # 2, 5 and 10 minutes: ~35 minutes on 2 cores
    python benchmarks/time_to_quality.py --minutes 2 5 10 20 --out outputs/ttq
    python benchmarks/time_to_quality.py --minutes 10 --no-course --out outputs/ttq-ours   # ours only

Ours: one fresh run per budget, the default recipe (`dforge train`'s defaults) run as `dforge train --minutes M`
(``optim.minutes``, training/budget.py): the trainer plans ``optim.steps`` from its own measured speed, every 20
steps, so that the steps end at 97% of the budget counted from building the trainer (data loading included) and
the learning rate's cosine ends with them; the budget is also a hard stop. The wall-clock column is the whole
run, from building the trainer to the final checkpoint and grid. (Before session 22 the step count was planned
once, from a throw-away 40-step run in this process, so a disturbance of the machine during those 40 steps
moved the whole plan.) Samples: the run's own sampler (``sample.sampler / steps / options`` of its config).

The course recipe (benchmarks/recipe.py, Hugging Face diffusion course unit 1): one run of the longest
budget with its weights copied at each budget. Its learning rate is constant and it has no EMA, so a copy
at minute m is exactly the run a budget of m minutes gives. Its samples: the best FD of its candidate
samplers at 20 NFE (default: euler_ancestral at eta 1.6, its best in benchmarks/recipe.py).

``--conditioning class``: ours is the class-conditional recipe (``conditioning.kind=class``, label dropout 0.1)
used as an unconditional generator, p(x) = sum_c p(c) p(x | c): sample i draws its label from the training
set's digit shares p(c) that the run records (``sampling.generate.data_class_labels``, seed i), then the image
from the conditional network at w = 1 (no guidance: one network call per step) with the sampler rule of
unconditional samples; ``dforge sample RUN --class data`` draws the same samples. It needs labels, so it is
an option, not the default recipe. ``--conditioning cluster``: the same with the ids of k-means clusters of the
training images in place of labels (``conditioning.kind=cluster``, ``conditioning.clusters`` 100 by default,
data/clusters.py; the clustering runs inside the timed budget), sampled the same way with clusters drawn from
their shares; it needs no labels.

``--autoguidance W``: ours sampled as `dforge sample RUN --autoguidance --autoguidance-scale W`, guided by the
run's own autoguidance snapshot (its weights at run.guide_snapshot_step, 500): x0 = x0_weak + W (x0_main -
x0_weak), two network calls a step (benchmarks/autoguide_recipe.py scores it on a finished run).

Both sample with bf16 autocast where the CPU has it (``precision="auto"``; benchmarks/throughput.py --fd: it
moves FD-Digits@1k by 0.26, less than another draw of seeds does).

FD-Digits: the Frechet distance in the features of the project's digit classifier (evaluate.digit_classifier)
against the MNIST test set; the floor: n real training images against the same set; recall: improved
recall (k = 3) in the same features against n test images; digit shares: the classifier's labels.
FD-LeNet (since session 23): the same Frechet distance in the features of a second, independent MNIST
classifier (evaluate.SECOND_DIGIT_RECIPE: another layout, seed and recipe, fixed before it scored a sample), with
its own floor; no target is set on it, it is there to show whether a gain in FD-Digits is a gain in the samples.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import parse_sampler, train_course  # noqa: E402

from diffusion_forge import evaluate  # noqa: E402
from diffusion_forge.data import load_mnist, to_uint8  # noqa: E402
from diffusion_forge.denoise.denoiser import Denoiser  # noqa: E402
from diffusion_forge.denoise.guidance import AutoGuidance  # noqa: E402
from diffusion_forge.io.checkpoint import load_guide_snapshot  # noqa: E402
from diffusion_forge.io.files import write_json  # noqa: E402
from diffusion_forge.sampling.generate import data_class_labels, generate  # noqa: E402
from diffusion_forge.sampling.registry import resolve_sampler  # noqa: E402
from diffusion_forge.training import Trainer, merge_config  # noqa: E402

SHARES = (0.07, 0.13)   # the target: every digit between 7% and 13% of the samples


def share_pass_rate(proportions, n: int, bounds=SHARES, draws: int = 200_000, seed: int = 0) -> float:
    """How often a perfect generator passes the digit-share target: P(lo <= c_k / n <= hi for every k) for counts
    c ~ Multinomial(n, proportions), by simulation. With MNIST's test proportions and n = 1,000 it is 0.93 (the
    fails: mostly the ones, 11.4% of the data, above 13%), so one FAIL alone is weak evidence of a biased
    generator, while a digit that is 10% of the data lands above 13.5% only with P about 3e-4."""
    lo, hi = bounds
    share = np.random.default_rng(seed).multinomial(n, np.asarray(proportions, dtype=float), size=draws) / n
    return float(((share >= lo) & (share <= hi)).all(axis=1).mean())


class Scorer:
    """FD-Digits, precision, recall and digit shares of uint8 samples, against the MNIST test set; FD-LeNet, the
    Frechet distance in a second, independent classifier's features, against the same set."""

    def __init__(self, n: int, seed: int = 0):
        self.clf = evaluate.digit_classifier()
        self.second = evaluate.digit_classifier(evaluate.SECOND_DIGIT_RECIPE)
        test, test_labels = load_mnist("test")
        train, _ = load_mnist("train")
        self.proportions = np.bincount(test_labels, minlength=10) / len(test_labels)
        self.test_features = self.clf.features(test)
        self.ref_stats = evaluate.feature_stats(self.test_features)
        self.second_ref_stats = evaluate.feature_stats(self.second.features(test))
        self.n = n
        idx = np.random.default_rng(seed).choice(len(train), n, replace=False)
        self.floor = self(train[idx])

    def __call__(self, images) -> dict:
        f = self.clf.features(images)
        precision, recall = evaluate.precision_recall(self.test_features[:self.n], f)
        share = torch.bincount(self.clf.predict_proba(images).argmax(1), minlength=10).double() / len(images)
        return {"fd": evaluate.frechet_distance(*evaluate.feature_stats(f), *self.ref_stats),
                "fd_lenet": evaluate.frechet_distance(*evaluate.feature_stats(self.second.features(images)),
                                                      *self.second_ref_stats),
                "precision": precision, "recall": recall,
                "min_share": float(share.min()), "max_share": float(share.max())}


def recipe_flags(seed: int, conditioning: str) -> dict:
    """`dforge train`'s defaults on MNIST, with the run's conditioning ("none" or "class")."""
    return {"data.source": "mnist", "run.seed": seed, "run.sample_every": 0, "conditioning.kind": conditioning}


def train_ours(out: Path, minutes: float, seed: int, conditioning: str = "none") -> tuple[Denoiser, dict]:
    """`dforge train --minutes MINUTES` of the recipe: the budget counts from building the trainer."""
    t0 = time.perf_counter()
    cfg = merge_config(flags={**recipe_flags(seed, conditioning), "optim.minutes": minutes})
    trainer = Trainer(cfg, out, progress=True, started=t0)
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    s = cfg.sample
    return trainer.ema_denoiser().eval(), {"steps": trainer.step, "wall_s": wall,
                                            "steps_per_s": trainer.step / summary["train_seconds"],
                                            "time_limit": bool(summary.get("time_limit")),
                                            "sampler": (s.sampler, s.steps, dict(s.options)),
                                            "class_frequencies": trainer.data.class_frequencies}


def autoguided(D: Denoiser, run: Path, scale: float | None):
    """D guided by the run's own autoguidance snapshot, x0 = x0_weak + scale (x0_main - x0_weak), as `dforge
    sample RUN --autoguidance --autoguidance-scale scale` samples it; D itself when scale is None."""
    return D if scale is None else AutoGuidance(D, load_guide_snapshot(run), scale)


def draw(D: Denoiser, n: int, sampler: str, steps: int, options: dict, cond: dict | None = None, seed: int = 0):
    with torch.no_grad():
        return to_uint8(generate(D, n, seed=seed, sampler=sampler, steps=steps, batch_size=250, cond=cond,
                                 sampler_options=options, progress=True, precision="auto"))


def plot(rows: list[dict], floor: float, path: Path) -> None:
    from diffusion_forge.viz.figures import _plt, save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, marker in (("ours", "o"), ("course", "s")):
        pts = [(r["minutes"], r[name]["fd"]) for r in rows if math.isfinite(r[name]["fd"])]
        if pts:                                   # --no-course leaves the course's rows at nan: no legend entry
            ax.plot(*zip(*pts), marker=marker, label=f"{name} recipe")
    ax.axhline(floor, color="gray", ls="--", lw=1, label="real vs real (floor)")
    ax.axhline(2 * floor, color="gray", ls=":", lw=1, label="2 x floor")
    ax.set(xscale="log", yscale="log", xlabel="wall-clock minutes of training (2 CPU cores)",
           ylabel="FD-Digits@1k", title="Time to quality on MNIST")
    ax.set_xticks([r["minutes"] for r in rows], [f"{r['minutes']:g}" for r in rows])
    ax.set_xticks([], minor=True)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, nargs="+", default=[2, 5, 10], help="wall-clock budgets")
    p.add_argument("--n", type=int, default=1000, help="samples per point (and real images for the floor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench-ttq", help="runs, results.json and time-to-quality.png")
    p.add_argument("--course-samplers", default="euler_ancestral:eta=1.6",
                   help="candidates for the course model, ';'-separated, NAME[:OPTION=VALUE,...]")
    p.add_argument("--no-course", action="store_true", help="ours only (e.g. to re-measure ours after a change)")
    p.add_argument("--conditioning", choices=("none", "class", "cluster"), default="none",
                   help="ours: the default (unconditional) recipe, the class-conditional one sampled with labels "
                        "drawn from the training set's digit frequencies (w = 1), or the cluster-conditional one "
                        "(k-means ids of the images, no labels; sampled with clusters drawn from their shares)")
    p.add_argument("--autoguidance", type=float, default=None, metavar="W",
                   help="ours: guided by the run's own autoguidance snapshot at scale W (default: unguided)")
    args = p.parse_args(argv)
    if min(args.minutes) <= 0 or args.n < 4:
        raise SystemExit("--minutes must be > 0 and --n >= 4 (precision / recall use 3 nearest neighbours)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    score = Scorer(args.n, args.seed)
    print(f"threads {torch.get_num_threads()}; floor at n={args.n}: {score.floor}", flush=True)

    rows = []
    for m in args.minutes:
        run = out / f"ours-{m:g}min"
        shutil.rmtree(run, ignore_errors=True)
        D, info = train_ours(run, m, args.seed, args.conditioning)
        p_c = info["class_frequencies"]                     # p(c) of a class-conditional run, else None
        cond = None if p_c is None else {"class_labels": data_class_labels(p_c, args.n, seed=0)}
        # as `dforge sample RUN --class data`: labels drawn from p(c), unguided, take the rule of such samples
        name, steps, options = resolve_sampler(*info["sampler"], samples="unconditional" if p_c is None else "data")
        D = autoguided(D, run, args.autoguidance)
        info["autoguidance"] = args.autoguidance
        result = score(draw(D, args.n, name, steps, options, cond))
        rows.append({"minutes": m, "ours": {**info, **result}})
        print(f"ours {m:g} min: {info['steps']} steps ({info['steps_per_s']:.2f} steps/s), {info['wall_s']:.0f} s, "
              f"{result}", flush=True)
    course = [] if args.no_course else \
        train_course(60 * max(args.minutes), args.seed, snapshot_minutes=args.minutes)[1]["snapshots"]
    for row in rows[len(course):]:
        row["course"] = {"steps": 0, "fd": float("nan"), "recall": float("nan")}
    for row, (D, info) in zip(rows, course):
        best = None
        for spec in args.course_samplers.split(";"):
            name, options = parse_sampler(spec)
            result = {**score(draw(D, args.n, name, 20, options)), "sampler": spec}
            best = result if best is None or result["fd"] < best["fd"] else best
        row["course"] = {**info, **best}
        print(f"course {info['minutes']:g} min: {info['steps']} steps, {best}", flush=True)

    floor = score.floor
    print(f"\nTime to quality, {args.n} samples, FD-Digits vs the MNIST test set (floor {floor['fd']:.2f}, "
          f"recall {floor['recall']:.3f}, digit shares {floor['min_share']:.1%}-{floor['max_share']:.1%}); ours at "
          f"its own sampler, the course at its best of {args.course_samplers}; FD-LeNet, the second classifier's, "
          f"floor {floor['fd_lenet']:.2f}\n")
    print("| minutes | ours: steps | wall s | FD | FD / floor | recall | digit shares | FD-LeNet / floor | "
          "course: steps | FD | FD / floor | recall |\n|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        o, c = r["ours"], r["course"]
        print(f"| {r['minutes']:g} | {o['steps']} | {o['wall_s']:.0f} | {o['fd']:.2f} | {o['fd'] / floor['fd']:.2f} | "
              f"{o['recall']:.3f} | {o['min_share']:.1%}-{o['max_share']:.1%} | {o['fd_lenet'] / floor['fd_lenet']:.2f} | "
              f"{c['steps']} | {c['fd']:.2f} | {c['fd'] / floor['fd']:.2f} | {c['recall']:.3f} |")
    ten = next((r["ours"] for r in rows if r["minutes"] == 10), None)
    if ten is not None:
        checks = {"FD <= 2 x floor": ten["fd"] <= 2 * floor["fd"],
                  "recall within 0.05 of the floor's": ten["recall"] >= floor["recall"] - 0.05,
                  "every digit 7-13% of the samples": SHARES[0] <= ten["min_share"] and ten["max_share"] <= SHARES[1]}
        for k, v in checks.items():
            print(f"  {'PASS' if v else 'FAIL'}  10 minutes: {k}")
        null = share_pass_rate(score.proportions, args.n)
        print(f"  (n = {args.n} samples drawn at exactly the test set's digit proportions pass the share target "
              f"{null:.1%} of the time)")
    plot(rows, floor["fd"], out / "time-to-quality.png")
    results = {"floor": floor, "conditioning": args.conditioning,
               "autoguidance": args.autoguidance, "rows": rows}
    write_json(out / "results.json", json.loads(json.dumps(results, default=str)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
