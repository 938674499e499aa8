"""`dforge train-classifier`: a noise-aware classifier p(y | x_t) for classifier guidance."""
from __future__ import annotations

EXAMPLES = """examples:
  dforge train-classifier --data mnist --like runs/mnist --out runs/mnist-cls     for the run's schedule and size
  dforge train-classifier --data mnist --out cls/mnist                            the default recipe's schedule
  dforge train-classifier --data digits --out cls/digits --preset tiny --steps 300   seconds on a CPU
  dforge sample runs/mnist --classifier runs/mnist-cls --class 3 --classifier-scale 2 --out threes.png

The classifier is trained on x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t ~ U{0..T-1}, with the
schedule of --like RUN (the default recipe's without it: cosine, T = 1000), and reports its held-out accuracy
on clean items and in four bands of t. It only guides runs of the same schedule, image size and classes.
"""


def register(sub) -> None:
    from . import HelpFormatter, add_force

    p = sub.add_parser("train-classifier", help="train a noise-aware classifier for classifier guidance",
                       description="Train a small classifier of noisy samples x_t (Dhariwal & Nichol 2021) into a "
                                   "folder (config.json, model.safetensors) that `dforge sample --classifier` uses "
                                   "to steer an unconditional or conditional run towards a class.",
                       formatter_class=HelpFormatter, epilog=EXAMPLES)
    p.add_argument("--data", required=True,
                   help="a labelled data set: a bundled name (mnist, digits, moons, ...), a folder with one "
                        "sub-folder per class, or hf:NAME")
    p.add_argument("--like", metavar="RUN", default=None,
                   help="a run folder of dforge train whose noise schedule and image size to copy "
                        "(default: the default recipe's schedule and the data's own size)")
    p.add_argument("--out", metavar="CLS", required=True, help="the classifier's folder (new or empty)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=128, help="items per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (cosine decay to lr/10)")
    p.add_argument("--preset", choices=("tiny", "small"), default="small",
                   help="network size: tiny (tests, seconds) or small (MNIST on a CPU in minutes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches, t and noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_force(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..training.classifier import train_classifier

    classifier = train_classifier(args.data, args.out, like=args.like, steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr, preset=args.preset, seed=args.seed, progress=not args.no_progress,
                                  device=args.device, force=args.force)
    print(f"wrote {classifier.path} ({classifier.num_classes} classes, samples of shape "
          f"{'x'.join(map(str, classifier.sample_shape))}); use it with: dforge sample RUN --classifier "
          f"{classifier.path} --class K --classifier-scale S")
    return 0
