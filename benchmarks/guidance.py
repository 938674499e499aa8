"""Guidance on MNIST: classifier-free guidance, classifier guidance and autoguidance at scales 0 to 5.

    python benchmarks/guidance.py                        # train 10 min + a classifier, then 18 settings x 1000 samples
    python benchmarks/guidance.py --uncond-run outputs/bench-recipe/ours   # + classifier guidance on that run
    python benchmarks/guidance.py --run RUN --classifier CLS --n 200 --scales 0,1,3     # reuse, quick look

1. The class-conditional default recipe (training.config's defaults + conditioning.kind=class, dropout 0.1;
   ``--set`` adds overrides) trains for at most ``--minutes`` of wall clock, the same budget as the
   unconditional recipe of benchmarks/recipe.py (it stops earlier when its optim.steps are done). The trainer
   keeps the autoguidance snapshot (run.guide_snapshot_step) on the way. ``--run RUN`` reuses a trained run.
2. A noise-aware classifier is trained ``--like`` the run (same schedule and image size; ``--classifier CLS``
   reuses one).
3. For each guidance kind and scale, ``--n`` samples over balanced classes (sample i asks for digit i mod 10,
   seed i, the same seeds for every setting) with the run's sample section (``--sampler`` / ``--steps``
   override it), scored by the project's digit classifier (evaluate/digits.py, 99.3% on real test digits):
   accuracy = the fraction it labels as the requested digit; FD-Digits@n = the Frechet distance in its 128-d
   features against the whole MNIST test set (as benchmarks/recipe.py); precision / recall (evaluate.metrics,
   k = 3) against n class-balanced MNIST test images. The "real" row: n class-balanced training images.

The kinds and their scales (pred = the network's prediction, x0 = the denoised estimate):
- ``cfg``: pred = pred_uncond + w (pred_cond - pred_uncond): w = 0 is the unconditional model (chance accuracy,
  10%), w = 1 the conditional one. Expected: accuracy rises with w and saturates near 100% by w = 2-3; FD is
  lowest at a moderate w (about 1-2: cleaner class modes), then rises as samples grow over-saturated and
  alike; recall falls monotonically with w (the price of guidance).
- ``classifier``: x0 += s sigma^2 / sqrt(1 + sigma^2) grad_{x_t} log p(y | x_t) (Dhariwal & Nichol 2021), on the
  conditional run at w = 1: s = 0 is the conditional model. Expected: a small gain in accuracy at s = 1-2 and
  the best FD near s = 1; large s follows the classifier's gradients into adversarial, non-digit strokes (FD
  and precision worsen).
- ``classifier-uncond`` (with ``--uncond-run RUN``): the same on an unconditional run: s = 0 is chance accuracy;
  the only way that run can draw a requested digit. Expected: accuracy rises steadily with s but stays below
  CFG's, FD best at s about 1-3.
- ``autoguidance``: x0 = x0_weak + s (x0_main - x0_weak) (Karras et al. 2024), the weak model being the run's
  early snapshot, same cond: s = 1 is the conditional model, s = 0 the snapshot. Expected: the best FD at
  s about 1.5-2 with little loss of recall (it sharpens without narrowing to the class mode); accuracy barely
  moves (it does not contrast labels), and large s overshoots into artefacts.
Settings that equal the plain conditional model exactly (cfg w = 1, classifier s = 0, autoguidance s = 1) are
sampled once and shared. Cost: sampling dominates: each setting draws --n samples at the run's steps, CFG
and autoguidance with two network evaluations per step, classifier guidance with a classifier backward pass.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import parse_sampler  # noqa: E402  (benchmarks/recipe.py: one parser of NAME:OPTION=VALUE)

import diffusion_forge as df  # noqa: E402
from diffusion_forge import evaluate  # noqa: E402
from diffusion_forge.data import load_mnist, to_uint8  # noqa: E402
from diffusion_forge.io.files import write_json  # noqa: E402
from diffusion_forge.sampling.generate import generate  # noqa: E402

KINDS = ("cfg", "cfg-interval", "classifier", "autoguidance", "classifier-uncond")
# Kynkaanniemi et al. 2024's guidance interval for EDM2 (sigma in (0.28, 5.42]), used as it is: not tuned here
GUIDANCE_INTERVAL = (0.28, 5.42)
SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)
# the scale at which a kind is the plain conditional model
IDENTITY = {"cfg": 1.0, "cfg-interval": 1.0, "classifier": 0.0, "autoguidance": 1.0}
LABELS = {"cfg": "CFG w", "cfg-interval": f"CFG w, sigma in {GUIDANCE_INTERVAL}", "classifier": "classifier s (at w = 1)",
          "autoguidance": "autoguidance s",
          "classifier-uncond": "classifier s (unconditional run)"}


def train_conditional(out: Path, seconds: float, seed: int, extra: dict) -> Path:
    """The class-conditional default recipe for at most ``seconds``; returns its run folder."""
    from diffusion_forge.training import Trainer, merge_config

    flags = {"data.source": "mnist", "conditioning.kind": "class", "conditioning.dropout": 0.1,
             "run.seed": seed, "run.sample_every": 0, **extra}
    run = out / "cond"
    trainer = Trainer(merge_config(flags=flags), run, progress=True, max_seconds=seconds)
    summary = trainer.fit()
    print(f"trained {trainer.step} steps in {summary['train_seconds']:.0f} s", flush=True)
    return run


def get_classifier(args, run: Path, out: Path):
    from diffusion_forge.models.classifier import load_classifier

    if args.classifier:
        return load_classifier(args.classifier)
    from diffusion_forge.training.classifier import train_classifier

    options = {} if args.classifier_steps is None else {"steps": args.classifier_steps}
    print(f"training a noise-aware classifier like {run}", flush=True)
    t0 = time.perf_counter()
    clf = train_classifier("mnist", out / "classifier", like=run, seed=args.seed, **options)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return clf


def guided(kind: str, scale: float, models: dict):
    """The denoiser of one setting (see the module docstring for what each scale means)."""
    if kind == "cfg":
        return df.ClassifierFreeGuidance(models["cond"], scale)
    if kind == "cfg-interval":
        return df.ClassifierFreeGuidance(models["cond"], scale, interval=GUIDANCE_INTERVAL)
    if kind == "classifier":
        return df.ClassifierGuidance(models["cond"], models["classifier"], scale)
    if kind == "classifier-uncond":
        return df.ClassifierGuidance(models["uncond"], models["classifier"], scale)
    if kind == "autoguidance":
        return df.AutoGuidance(models["cond"], models["weak"], scale)
    raise ValueError(f"unknown guidance kind {kind!r}; choose from {', '.join(KINDS)}")


class Scorer:
    """Accuracy of the requested digit, FD-Digits@n against the MNIST test set, precision / recall against n
    class-balanced test images, all in the project's digit classifier."""

    def __init__(self, n: int, seed: int):
        self.clf = evaluate.digit_classifier()
        test_images, test_labels = load_mnist("test")
        train_images, train_labels = load_mnist("train")
        self.ref_stats = evaluate.feature_stats(self.clf.features(test_images))
        self.real = self.clf.features(test_images[balanced(test_labels, n, seed)])
        idx = balanced(train_labels, n, seed + 1)
        self.floor = self.score_images(train_images[idx][..., None], torch.as_tensor(train_labels[idx]))

    def score_images(self, images: np.ndarray, labels: torch.Tensor) -> dict:
        probs = self.clf.predict_proba(images)
        feats = self.clf.features(images)
        precision, recall = evaluate.precision_recall(self.real, feats)
        return {"accuracy": float((probs.argmax(1) == labels).double().mean()),
                "fd": evaluate.frechet_distance(*evaluate.feature_stats(feats), *self.ref_stats),
                "precision": precision, "recall": recall}


def balanced(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices, n / 10 of each digit (the first n mod 10 digits get one more), drawn without replacement."""
    rng = np.random.default_rng(seed)
    per = [n // 10 + (d < n % 10) for d in range(10)]
    return np.concatenate([rng.choice(np.flatnonzero(labels == d), k, replace=False) for d, k in enumerate(per)])


def sampler_of(args, config: dict) -> tuple[str | None, int, dict]:
    """--sampler NAME[:OPTION=VALUE,...] / --steps, else the run's sample section."""
    s = config.get("sample", {})
    if args.sampler:
        name, options = parse_sampler(args.sampler)
    else:
        name, options = s.get("sampler"), dict(s.get("options") or {})
    return name, args.steps or int(s.get("steps", 20)), options


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--scales takes numbers separated by commas (e.g. 0,1,2), got {text!r}")
    if not scales or any(s < 0 for s in scales):
        raise SystemExit(f"--scales needs at least one scale, all >= 0; got {text!r}")
    return scales


def plot(results: list[dict], floor: dict, path: Path, title: str) -> None:
    from diffusion_forge.viz import _plt, save_figure

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind in dict.fromkeys(r["kind"] for r in results):
        rows = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["scale"])
        for ax, key, scale in zip(axes, ("accuracy", "fd", "recall"), (100, 1, 100)):
            ax.plot([r["scale"] for r in rows], [scale * r[key] for r in rows], "o-", label=LABELS[kind])
    for ax, key, scale in zip(axes, ("accuracy", "fd", "recall"), (100, 1, 100)):
        ax.axhline(scale * floor[key], color="grey", ls="--", lw=1, label="real training digits")
    for ax, ylabel in zip(axes, ("requested digit (%)", "FD-Digits (lower is better)", "recall (%)")):
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def table(results: list[dict], floor: dict, n: int) -> str:
    lines = [f"| guidance | scale | requested digit | FD-Digits@{evaluate.count_label(n)} | precision | recall | "
             "sample s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        took = "(shared)" if r.get("shared") else f"{r['sample_s']:.0f}"
        lines.append(f"| {r['kind']} | {r['scale']:g} | {r['accuracy']:.1%} | {r['fd']:.3f} | {r['precision']:.3f} "
                     f"| {r['recall']:.3f} | {took} |")
    lines.append(f"| real (train) | | {floor['accuracy']:.1%} | {floor['fd']:.3f} | {floor['precision']:.3f} "
                 f"| {floor['recall']:.3f} | |")
    return "\n".join(lines)


def recommend(results: list[dict], uncond_fd: float | None) -> dict:
    """The recommended CFG scale: the lowest FD among CFG scales whose accuracy is >= 99% (else the most
    accurate one), and the issue's targets at it."""
    cfg = [r for r in results if r["kind"] == "cfg"]
    if not cfg:
        return {}
    good = [r for r in cfg if r["accuracy"] >= 0.99]
    best = min(good, key=lambda r: r["fd"]) if good else max(cfg, key=lambda r: (r["accuracy"], -r["fd"]))
    checks = {"accuracy >= 99% at the recommended scale": best["accuracy"] >= 0.99}
    if uncond_fd is not None:
        checks["FD <= the unconditional run's FD"] = best["fd"] <= uncond_fd
    return {"guidance_scale": best["scale"], "accuracy": best["accuracy"], "fd": best["fd"], "checks": checks}


def main(argv=None) -> int:
    try:
        return run_benchmark(argv)
    except ValueError as e:   # bad input (a run without a snapshot, a classifier that does not fit, ...)
        print(f"guidance.py: error: {e}", file=sys.stderr)
        return 2


def run_benchmark(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget (as benchmarks/recipe.py)")
    p.add_argument("--n", type=int, default=1000, help="samples per setting, balanced over the 10 digits")
    p.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES), help="guidance scales, comma-separated")
    p.add_argument("--kinds", default="cfg,classifier,autoguidance",
                   help=f"comma-separated, of {', '.join(KINDS)} (classifier-uncond is added with --uncond-run)")
    p.add_argument("--run", default=None, help="reuse this trained class-conditional run folder instead of training")
    p.add_argument("--uncond-run", default=None, help="an unconditional run (e.g. benchmarks/recipe.py's "
                                                      "OUT/ours): also classifier guidance on it")
    p.add_argument("--classifier", default=None, help="reuse this noise-aware classifier folder")
    p.add_argument("--classifier-steps", type=int, default=None, help="steps of the classifier (none: train_classifier's)")
    p.add_argument("--sampler", default=None, help="NAME[:OPTION=VALUE,...] (none: the run's sample section)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (none: the run's sample.steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="training config overrides of the conditional run (e.g. run.guide_snapshot_step=100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench-guidance", help="folder for the run, grids, plot and results.json")
    args = p.parse_args(argv)

    from diffusion_forge.io.checkpoint import load_guide_snapshot, load_model_from_run
    from diffusion_forge.models.classifier import check_classifier_fits
    from diffusion_forge.training import parse_set_flags
    from diffusion_forge.viz import save_image_grid

    scales = parse_scales(args.scales)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.uncond_run and "classifier-uncond" not in kinds:
        kinds.append("classifier-uncond")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise SystemExit(f"unknown guidance kind(s) {unknown}; choose from {', '.join(KINDS)}")
    if "classifier-uncond" in kinds and not args.uncond_run:
        raise SystemExit("classifier-uncond needs an unconditional run: pass --uncond-run RUN")
    if args.n < 10:
        raise SystemExit(f"--n must be at least 10 (one sample per digit), got {args.n}")
    out = Path(args.out)
    if not args.run and (out / "cond").exists():
        raise SystemExit(f"{out / 'cond'} exists: reuse it with --run {out / 'cond'}, remove it, or pick --out")
    out.mkdir(parents=True, exist_ok=True)

    print(f"threads: {torch.get_num_threads()}", flush=True)
    run = Path(args.run) if args.run else train_conditional(out, args.minutes * 60, args.seed,
                                                            parse_set_flags(args.set))
    models = {"cond": load_model_from_run(run)}
    if not models["cond"].null_cond:
        raise SystemExit(f"{run} is not a class-conditional run with a null class: train it with "
                         "conditioning.kind=class and conditioning.dropout > 0")
    if "autoguidance" in kinds:
        models["weak"] = load_guide_snapshot(run)
    if args.uncond_run:
        models["uncond"] = load_model_from_run(args.uncond_run)
    if {"classifier", "classifier-uncond"} & set(kinds):
        models["classifier"] = get_classifier(args, run, out)
        check_classifier_fits(models["classifier"], models["cond"])
        if "uncond" in models:
            check_classifier_fits(models["classifier"], models["uncond"])
    sampler, steps, options = sampler_of(args, models["cond"].config)
    print(f"conditional run {run} (step {models['cond'].step}); sampler {sampler} {options}, {steps} steps",
          flush=True)

    scorer = Scorer(args.n, args.seed)
    labels = torch.arange(args.n) % 10      # sample i asks for digit i mod 10
    shared: dict | None = None              # the plain conditional model's scores (see IDENTITY)
    results = []
    for kind in kinds:
        for scale in scales:
            plain = IDENTITY.get(kind) == scale
            if plain and shared is not None:
                results.append({**shared, "kind": kind, "scale": scale, "sample_s": 0.0, "shared": True})
                continue
            t0 = time.perf_counter()
            x = generate(guided(kind, scale, models), args.n, seed=args.seed, sampler=sampler, steps=steps,
                         sampler_options=options, cond={"class_labels": labels}, batch_size=250, progress=True)
            images = to_uint8(x)
            row = {"kind": kind, "scale": scale, **scorer.score_images(images, labels),
                   "sample_s": time.perf_counter() - t0}
            save_image_grid(images[:100], out / "grids" / f"{kind}-{scale:g}.png", nrow=10,
                            title=f"{LABELS[kind]} = {scale:g} (column = requested digit)")
            print(f"  {kind:<18} {scale:>4g}  digit {row['accuracy']:6.1%}  FD {row['fd']:8.3f}  "
                  f"P {row['precision']:.3f}  R {row['recall']:.3f}  ({row['sample_s']:.0f} s)", flush=True)
            results.append(row)
            if plain:
                shared = {k: v for k, v in row.items() if k not in ("kind", "scale")}

    uncond = next((r for r in results if r["kind"] == "classifier-uncond" and r["scale"] == 0), None)
    rec = recommend(results, uncond["fd"] if uncond else None)
    title = (f"Guidance on MNIST: {models['cond'].step} steps (class-conditional default recipe), n = {args.n}, "
             f"{sampler} {steps} steps")
    print(f"\n{title}; FD-Digits vs the MNIST test set; precision / recall vs {args.n} test images\n")
    print(table(results, scorer.floor, args.n))
    if rec:
        print(f"\nrecommended sample.guidance_scale: {rec['guidance_scale']:g} (lowest FD with >= 99% of the "
              "requested digit)")
        for k, v in rec["checks"].items():
            print(f"  {'PASS' if v else 'FAIL'}  {k}")
    plot(results, scorer.floor, out / "guidance.png", title)
    write_json(out / "results.json", {"run": str(run), "step": models["cond"].step, "n": args.n,
                                      "sampler": sampler, "steps": steps, "sampler_options": options,
                                      "results": results, "real": scorer.floor, "recommended": rec})
    print(f"\nwrote {out / 'results.json'}, {out / 'guidance.png'} and grids in {out / 'grids'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
